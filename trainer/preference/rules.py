"""The rules between the `preference` keys and the rest of a config, which the run plan checks
(trainer/plan.py): one line per problem, naming the key."""

from __future__ import annotations

from trainer.config.schema import Config, PreferenceConfig
from trainer.data.preference_rows import PREFERENCE_FORMATS, UNPAIRED
from trainer.preference.reference_model import reference_mode

# The keys each loss reads beside beta; any other set away from its default is refused.
_OWN_KEYS = {"label_smoothing": ("dpo", "robust"), "gamma": ("simpo",)}


def preference_data(cfg: Config) -> list[tuple[str, str]]:
    """(key, format) of every training data set and eval set of preference data."""
    found = [(f"data.datasets.{i}", ds.format) for i, ds in enumerate(cfg.data.datasets)
             if ds.format in PREFERENCE_FORMATS]
    if cfg.data.eval.path and cfg.data.eval.format in PREFERENCE_FORMATS:
        found.append(("data.eval", cfg.data.eval.format))
    found += [(f"data.eval.sets.{i}", s.format) for i, s in enumerate(cfg.data.eval.sets)
              if s.format in PREFERENCE_FORMATS]
    return found


def preference_problems(cfg: Config) -> list[str]:
    p, defaults, problems = cfg.preference, PreferenceConfig(), []
    data = preference_data(cfg)
    trained = [key for key, _ in data if key.startswith("data.datasets.")]
    if not trained:
        changed = [f.name for f in p.__dataclass_fields__.values() if getattr(p, f.name) != getattr(defaults, f.name)]
        problems += [f"preference.{name}: the run trains no preference data (a data set of format preference or "
                     "unpaired_preference)" for name in changed]
        problems += [f"{key}.format: {fmt} sets are scored with the run's preference loss, but the run trains no "
                     "preference data" for key, fmt in data]
        return problems
    reward_model = cfg.model.task == "reward_model"
    if not reward_model:
        for name, losses in _OWN_KEYS.items():
            if p.loss not in losses and getattr(p, name) != getattr(defaults, name):
                problems.append(f"preference.{name}: preference.loss {p.loss} does not use it "
                                f"(it belongs to {' and '.join(losses)})")
        if p.loss == "orpo" and p.sft_weight:
            problems.append("preference.sft_weight: orpo adds the chosen answer's NLL itself; leave it 0")
        problems += [f"{key}.format: unpaired_preference rows (one judged answer each) train only with "
                     f"preference.loss kto, not {p.loss}" for key, fmt in data if fmt == UNPAIRED and p.loss != "kto"]
    else:  # its data's formats are format_problems' (trainer/data/eval_sets.py)
        changed = [name for name in ("loss", "beta", "label_smoothing", "gamma", "sft_weight")
                   if getattr(p, name) != getattr(defaults, name)]
        problems += [f"preference.{name}: model.task reward_model trains with the Bradley-Terry loss "
                     "(margins come from the data's margin field); leave it unset" for name in changed]
        if cfg.model.num_labels != 2:  # the default, which a reward model's single score replaces
            problems.append("model.num_labels: a reward model has one score; leave it unset")
    mode = reference_mode(cfg)
    if mode is None and p.reference != "auto":
        why = "model.task reward_model" if reward_model else f"preference.loss {p.loss}"
        problems.append(f"preference.reference: {why} uses no reference model; leave it auto")
    if mode == "adapter" and cfg.peft.method == "none":
        problems.append("preference.reference: adapter switches the peft adapter off, but peft.method is none; "
                        "use precomputed or copy")
    if cfg.parallel.sequence_parallel > 1:
        problems.append("parallel.sequence_parallel: preference losses need each sequence's whole log-probability "
                        "on one rank; set parallel.sequence_parallel=1 (pairs are packed pad-free instead)")
    if reward_model and cfg.data.packing:
        problems.append("data.packing: a reward model scores each sequence from its last token in a padded row of "
                        "its own; set data.packing=false")
    return problems
