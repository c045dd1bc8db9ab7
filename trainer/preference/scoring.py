"""Each preference sequence of a micro-batch scored in one forward: its summed log-probability
(through the target-only head: no [tokens, vocab] logits), or a reward model's score.

The collator laid every sequence out as a document of its own (trainer/data/collate.py), so in
a packed row a sequence attends to itself only and its first token is nobody's target; here the
log-probability of each target is added to the sequence its token belongs to
(`PreferenceSequences.token_sequence`). Targets of other documents in the same micro-batch
(rehearsal text or chat rows) come back apart, for the language-model loss.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.data.collate import Batch
from trainer.model.loss import IGNORE_INDEX, token_log_probs
from trainer.preference.losses import Scored


def sequence_targets(batch: Batch) -> torch.Tensor:
    """[S] target tokens of each preference sequence (counted on the host, without a forward)."""
    preference = batch.preference
    labels, owner = batch.labels.cpu(), preference.token_sequence.cpu()
    owner = owner[..., 1:][labels[..., 1:] != IGNORE_INDEX]
    return torch.bincount(owner[owner >= 0], minlength=preference.num_sequences)


def language_model_targets(batch: Batch) -> int:
    """Targets of the micro-batch outside preference sequences (rehearsal rows)."""
    if batch.preference is None:
        return batch.num_targets
    return batch.num_targets - int(sequence_targets(batch).sum())


def score_sequences(model: nn.Module, batch: Batch, device: torch.device, task: str) -> tuple[Scored, torch.Tensor]:
    """Forward `batch` through `model` (gradients as the caller's mode has them): its preference
    sequences scored (no reference yet), and the log-probabilities of the other targets."""
    preference = batch.preference
    inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
    labels = batch.labels.to(device)
    tokens = sequence_targets(batch).to(device)
    if task == "reward_model":  # a padded row per sequence; the head scores its last token
        scores = model(**inputs).logits[:, 0].float()
        policy, others = scores, scores.new_zeros(0)
    else:
        logps, is_target = token_log_probs(model, inputs, labels)
        owner = preference.token_sequence.to(device)[..., 1:][is_target]
        mine = owner >= 0
        policy = logps.new_zeros(preference.num_sequences).index_add(0, owner[mine], logps[mine])
        others = logps[~mine]
    return Scored(policy, None, tokens, preference.pair.to(device), preference.chosen.to(device),
                  preference.margin.to(device)), others
