"""`preference.reference: precomputed` (trainer/preference/precompute.py): the initial model's
log-probabilities of every sequence, computed in chunks before step 1 and stored beside the
tokenized cache; a pass stopped midway resumes with the chunks it finished, and the table equals
what the model computes for each pair."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers import preference_config, write_config
from trainer.config.schema import load_config
from trainer.loop import Trainer
from trainer.preference import precompute
from trainer.preference.reference_model import evaluating
from trainer.preference.scoring import score_sequences


def test_the_pass_is_chunked_resumable_and_equals_the_initial_model(tmp_path, monkeypatch):
    monkeypatch.setattr(precompute, "CHUNK_EXAMPLES", 8)
    cfg = preference_config(tmp_path, rows=40, data={"eval": {"fraction": 0.1}}, train={"max_steps": 1})
    config = write_config(cfg, tmp_path / "config.yaml")
    trainer = Trainer(load_config(config))
    table = trainer.objective.reference.tables["pairs"]
    assert table.shape == (40, 2) and np.isfinite(table).all()  # held-out pairs too
    folder = next((tmp_path / "cache" / "reference").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [f"chunk-{c:06d}.npy" for c in range(5)] + ["logps.npy"]
    batch = trainer.loader.next_step(1)[0]
    with torch.no_grad(), evaluating(trainer.strategy.model):
        scored = score_sequences(trainer.strategy.model, batch, trainer.dist.device, "causal_lm")[0]
    for value, (name, example, part) in zip(scored.policy.tolist(), batch.preference.keys):
        assert table[example, part] == pytest.approx(value, rel=1e-5)

    # stopped after 3 of its 5 chunks: the next run computes the other 2 only, to the same table
    (folder / "logps.npy").unlink()
    for c in (1, 4):
        (folder / f"chunk-{c:06d}.npy").unlink()
    computed = []
    compute = precompute._compute
    monkeypatch.setattr(precompute, "_compute", lambda *args: computed.append(args[3]) or compute(*args))
    again = Trainer(load_config(config, [f"run.output_dir={tmp_path / 'again'}"]))
    assert computed == [[1, 4]]
    np.testing.assert_array_equal(again.objective.reference.tables["pairs"], table)
    assert (folder / "logps.npy").is_file()
    Trainer(load_config(config, [f"run.output_dir={tmp_path / 'third'}"]))  # now a cache hit
    assert computed == [[1, 4]]
