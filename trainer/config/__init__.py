"""What a run is asked to do: the config schema (dataclasses with each key's default and rule),
how YAML and dotted overrides become that tree, the vocabulary of what a config asks of a
parallel strategy, and the types of the run plan (decided in trainer/plan.py)."""
