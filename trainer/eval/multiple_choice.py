"""Multiple-choice eval sets (`format: choice`): accuracy as lm-evaluation-harness scores it.

A question is a context, its choices and the index of the answer (trainer/data/formats.py
reads MMLU-, HellaSwag- and ARC-shaped records). Each choice is scored by the
log-likelihood of its continuation, `" " + choice` (the harness's default target
delimiter), after the context; `acc` counts the questions whose answer scores highest,
`acc_norm` those whose answer scores highest per character of the choice, as the harness's
`multiple_choice` tasks define them (ties go to the first choice, as numpy's argmax does).
Tokens are cut as the harness cuts them: trailing whitespace of the context moves to the
continuation, and a continuation's tokens are those of context + continuation past the
tokens of the context alone (with the tokenizer's special tokens, as `tokenizer.encode`
adds them); an empty context is the BOS (else EOS) token.

Layout. With sdpa or eager attention a question's choices share the context's computation:
one row holds the context once and then every choice's tokens, each choice attending to
the context and to itself only (a 4D mask; its positions continue the context's), so a
question costs its context once instead of once per choice; the context's last position
predicts the first token of every choice. Questions are packed into rows of `data.seq_len`
tokens, `train.micro_batch_size` rows per forward. A question whose context and choices do
not fit a row, and every question under flash-attention's varlen kernels (whose document
boundaries cannot express a shared prefix) or prompt and prefix tuning (which cannot
isolate packed documents), is laid out as one document per choice (context + choice, its
context cut from the left to fit `data.seq_len` as the harness cuts to the model's length);
varlen packs those documents into rows, prompt and prefix tuning pad one per row.

Ranks. The micro-batches are laid out the same way at every world size and dealt to ranks
round-robin; every rank runs the same number of forwards (sharded models gather parameters
in each; a rank with no batch left in the last round recomputes one and drops it), and each
choice's log-likelihood, computed on exactly one rank, is summed over ranks, so every rank
scores every question and the scores do not depend on the number of ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.config.schema import Config, cache_root
from trainer.data.eval_sets import EvalSet, declared_sets
from trainer.data.formats import choice_question, context_fallback_note
from trainer.data.records import RowError, field_names
from trainer.data.run_data import resolve_source
from trainer.data.sources import location, read_rows
from trainer.model.attention import MASKED_ATTENTION, VARLEN_ATTENTION
from trainer.model.loss import target_log_probs
from trainer.runtime.distributed import all_reduce_sum
from trainer.runtime.errors import DataError

log = logging.getLogger("finetrain")

TARGET_DELIMITER = " "  # lm-evaluation-harness's default between context and choice


@dataclass
class TokenizedQuestion:
    context: list[int]
    continuations: list[list[int]]  # one per choice
    answer: int
    choice_chars: list[int]  # characters of each choice, acc_norm's denominator


def _encode(tokenizer, text: str) -> list[int]:
    """The harness's `tok_encode`: the tokenizer's special tokens, unless the text starts
    with the BOS (else EOS) token's text already."""
    prefix = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
    special = not (prefix and text.startswith(prefix))
    return tokenizer.encode(text, add_special_tokens=special)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-evaluation-harness's HF model
    encodes a log-likelihood request (`loglikelihood` and `_encode_pair`)."""
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], ids) if ids[0] != prefix else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def tokenize_question(tokenizer, context: str, choices: list[str] | tuple[str, ...], answer: int) -> TokenizedQuestion:
    pairs = [encode_pair(tokenizer, context, TARGET_DELIMITER + choice) for choice in choices]
    if any(not continuation for _, continuation in pairs):
        raise RowError("a choice encodes to no tokens after the context")
    return TokenizedQuestion(pairs[0][0], [c for _, c in pairs], answer, [len(c) for c in choices])


# --------------------------------------------------------------------------- layout


@dataclass
class _Unit:
    """A context and the choices that share it, laid out in one row: the context's tokens,
    then each choice's continuation but its last token (which predicts nothing)."""

    context: list[int]
    continuations: list[list[int]]
    choice_ids: list[int]  # global index of each continuation's choice

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class ChoiceBatch:
    """One forward: the model's inputs, and which positions score which choice's tokens."""

    inputs: dict
    rows: torch.Tensor  # [N] position of each target token: row ...
    cols: torch.Tensor  # ... and column of input_ids
    targets: torch.Tensor  # [N] the token
    choice_ids: torch.Tensor  # [N] the choice whose log-likelihood it adds to


@dataclass
class ChoiceSet:
    name: str
    questions: list[TokenizedQuestion]
    batches: list[ChoiceBatch] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        return sum(len(q.continuations) for q in self.questions)


def choice_layout(attention: str, peft_method: str) -> str:
    """`shared` (a question's choices after one context, sdpa and eager), `varlen` (one
    document per choice, packed, flash-attention varlen) or `padded` (one per row: prompt and
    prefix tuning)."""
    if peft_method in ("prompt_tuning", "prefix_tuning"):
        return "padded"
    if attention in VARLEN_ATTENTION:
        return "varlen"
    if attention in MASKED_ATTENTION:
        return "shared"
    return "padded"


def _units(questions: list[TokenizedQuestion], seq_len: int, shared: bool, where: str) -> list[_Unit]:
    units, first = [], 0
    for number, q in enumerate(questions):
        ids = list(range(first, first + len(q.continuations)))
        first += len(q.continuations)
        unit = _Unit(q.context, q.continuations, ids)
        if shared and unit.length <= seq_len:
            units.append(unit)
            continue
        for continuation, choice in zip(q.continuations, ids):
            if len(continuation) > seq_len:
                raise DataError(f"{where}: question {number + 1}: a choice of {len(continuation)} tokens does not fit "
                                f"data.seq_len {seq_len}")
            whole = (q.context + continuation)[-(seq_len + 1):]  # the harness's left truncation
            units.append(_Unit(whole[: len(whole) - len(continuation)], [continuation], [choice]))
    return units


def _rows(units: list[_Unit], seq_len: int, one_per_row: bool) -> list[list[_Unit]]:
    rows: list[list[_Unit]] = []
    used = seq_len
    for unit in units:
        if one_per_row or used + unit.length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(unit)
        used += unit.length
    return rows


def _row_arrays(row: list[_Unit]):
    """Token ids, positions, (group, branch) of each token, and the scored targets as
    (column, target, choice) for one row of units."""
    ids, positions, groups, branches, scored = [], [], [], [], []
    for g, unit in enumerate(row):
        start = len(ids)
        ids += unit.context
        positions += range(len(unit.context))
        groups += [g] * len(unit.context)
        branches += [0] * len(unit.context)
        last_context = len(ids) - 1
        for b, (continuation, choice) in enumerate(zip(unit.continuations, unit.choice_ids), start=1):
            begin = len(ids)
            ids += continuation[:-1]
            positions += range(len(unit.context), len(unit.context) + len(continuation) - 1)
            groups += [g] * (len(continuation) - 1)
            branches += [b] * (len(continuation) - 1)
            for j, token in enumerate(continuation):
                scored.append((last_context if j == 0 else begin + j - 1, token, choice))
        assert len(ids) - start == unit.length
    return ids, positions, groups, branches, scored


def _batch(rows: list[list[_Unit]], layout: str, attention: str, pad_token_id: int, mask_dtype: torch.dtype,
           position_ids: bool) -> ChoiceBatch:
    arrays = [_row_arrays(row) for row in rows]
    targets = [(r, col, token, choice) for r, a in enumerate(arrays) for col, token, choice in a[4]]
    if layout == "varlen":  # rows flattened, each unit a document of its own
        ids = [t for a in arrays for t in a[0]]
        offsets = np.cumsum([0] + [len(a[0]) for a in arrays])
        lengths = [u.length for row in rows for u in row]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([[p for a in arrays for p in a[1]]]),
                  "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
        targets = [(0, int(offsets[r]) + col, token, choice) for r, col, token, choice in targets]
    else:
        width = max(len(a[0]) for a in arrays)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, a in enumerate(arrays):
            input_ids[r, : len(a[0])] = torch.tensor(a[0])
            positions[r, : len(a[0])] = torch.tensor(a[1])
            positions[r, len(a[0]):] = torch.arange(width - len(a[0]))  # the padding: a document of its own
        inputs = {"input_ids": input_ids}
        if layout == "shared":
            inputs["position_ids"] = positions
            inputs["attention_mask"] = _shared_mask(arrays, width, attention, mask_dtype)
        else:
            real = torch.zeros((len(rows), width), dtype=torch.long)
            for r, a in enumerate(arrays):
                real[r, : len(a[0])] = 1
            inputs["attention_mask"] = real
            if position_ids:
                inputs["position_ids"] = torch.arange(width).expand(len(rows), -1).clone()
    inputs["use_cache"] = False
    columns = list(zip(*targets))
    return ChoiceBatch(inputs, torch.tensor(columns[0]), torch.tensor(columns[1]), torch.tensor(columns[2]),
                       torch.tensor(columns[3]))


def _shared_mask(arrays, width: int, attention: str, mask_dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, W, W]: a token attends to earlier tokens of its own question that are its
    context or its own choice (the padding tail is a group of its own)."""
    groups = torch.full((len(arrays), width), -1, dtype=torch.long)
    branches = torch.zeros((len(arrays), width), dtype=torch.long)
    for r, a in enumerate(arrays):
        groups[r, : len(a[2])] = torch.tensor(a[2])
        branches[r, : len(a[3])] = torch.tensor(a[3])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_group = groups[:, :, None] == groups[:, None, :]
    visible = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    allowed = (same_group & visible & causal)[:, None]
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)


def lay_out(questions: list[TokenizedQuestion], seq_len: int, micro_batch_size: int, attention: str, layout: str,
            pad_token_id: int, mask_dtype: torch.dtype = torch.float32, position_ids: bool = True,
            where: str = "choice set") -> list[ChoiceBatch]:
    """The micro-batches that score every choice of `questions` (the same at every world size)."""
    units = _units(questions, seq_len, layout == "shared", where)
    rows = _rows(units, seq_len, one_per_row=layout == "padded")
    return [_batch(rows[i: i + micro_batch_size], layout, attention, pad_token_id, mask_dtype, position_ids)
            for i in range(0, len(rows), micro_batch_size)]


# --------------------------------------------------------------------------- reading


def read_questions(eval_set: EvalSet, cfg: Config, tokenizer) -> list[TokenizedQuestion]:
    """The first `max_examples` questions of a choice set's file, tokenized; a bad row stops
    with its file and line (or, with data.on_bad_row=skip, is counted and skipped)."""
    cache_dir = cache_root(cfg)
    path = resolve_source(eval_set.path, "choice", eval_set.key, cache_dir)
    names = field_names("choice", eval_set.fields, f"{eval_set.key}.fields")
    questions, skipped = [], []
    for row in read_rows(path, cache_dir / "hf"):
        if len(questions) >= eval_set.max_examples:
            break
        try:
            if row.error is not None:
                raise RowError(row.error)
            q = choice_question(row.record, names)
            if q.context_from != names["context"] and not questions:
                log.info("%s", context_fallback_note(eval_set.path))
            questions.append(tokenize_question(tokenizer, q.context, q.choices, q.answer))
        except RowError as err:
            where = location(eval_set.path, row.number, row.by_line)
            if cfg.data.on_bad_row == "error":
                raise DataError(f"{where}: {err} (set data.on_bad_row=skip to skip bad rows)") from None
            skipped.append(f"{where}: {err}")
    if skipped:
        log.warning("%s: skipped %d bad rows (data.on_bad_row=skip); first: %s", eval_set.path, len(skipped),
                    "; ".join(skipped[:3]))
    if not questions:
        raise DataError(f"{eval_set.path}: no question in choice set {eval_set.name!r} ({eval_set.key}.path)")
    return questions


def build_choice_sets(cfg: Config, tokenizer, attention: str) -> dict[str, ChoiceSet]:
    """Every choice set of `data.eval`, read, tokenized and laid out into micro-batches."""
    layout = choice_layout(attention, cfg.peft.method)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets = {}
    for eval_set in declared_sets(cfg):
        if eval_set.format != "choice":
            continue
        questions = read_questions(eval_set, cfg, tokenizer)
        batches = lay_out(questions, cfg.data.seq_len, cfg.train.micro_batch_size, attention, layout, pad,
                          getattr(torch, cfg.model.dtype), cfg.peft.method != "prompt_tuning", eval_set.path)
        sets[eval_set.name] = ChoiceSet(eval_set.name, questions, batches)
    return sets


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def choice_log_likelihoods(strategy, choice_set: ChoiceSet) -> list[list[float]]:
    """Each question's log-likelihood of each choice, on every rank (collective)."""
    model, device = strategy.model, strategy.dist.device
    world, rank = strategy.dist.world_size, strategy.dist.rank
    batches = choice_set.batches
    totals = torch.zeros(choice_set.num_choices, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for round_index in range(math.ceil(len(batches) / world)):
        index = round_index * world + rank
        batch = batches[index] if index < len(batches) else batches[0]  # a stand-in keeps this rank in step
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
        with strategy.autocast():
            log_probs = target_log_probs(model, inputs, batch.rows, batch.cols, batch.targets)
        if index < len(batches):
            totals.index_add_(0, batch.choice_ids, log_probs.double().cpu())
    model.train(was_training)
    all_reduce_sum(totals)
    values, first = totals.tolist(), 0
    result = []
    for q in choice_set.questions:
        result.append(values[first: first + len(q.continuations)])
        first += len(q.continuations)
    return result


def accuracy(questions: list[TokenizedQuestion], log_likelihoods: list[list[float]]) -> dict[str, float]:
    """`acc` and `acc_norm` as lm-evaluation-harness computes them for multiple-choice tasks."""
    acc = acc_norm = 0
    for q, lls in zip(questions, log_likelihoods):
        lls = np.asarray(lls, dtype=np.float64)
        acc += int(np.argmax(lls)) == q.answer
        acc_norm += int(np.argmax(lls / np.asarray(q.choice_chars, dtype=np.float64))) == q.answer
    return {"acc": acc / len(questions), "acc_norm": acc_norm / len(questions)}


def evaluate_choice_set(strategy, choice_set: ChoiceSet) -> dict[str, float]:
    """{acc, acc_norm} of one choice set (collective)."""
    return accuracy(choice_set.questions, choice_log_likelihoods(strategy, choice_set))
