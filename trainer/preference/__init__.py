"""Preference tuning: DPO and its family, KTO and reward models on packed, isolated pairs
(docs/preference.md)."""
