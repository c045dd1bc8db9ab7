"""Greedy answers to held-out prompts, scored against the held-out answers.

`data.eval.generate: N` takes the first N held-out conversations of each chat or
instruction eval set; the prompt is the conversation up to its last assistant turn,
rendered with the chat template and its generation prompt, and the reference is that
turn, which the answer is scored against with the set's metrics (trainer/eval/scores.py).
Answers end at EOS or at the token the template closes an assistant turn with (ChatML's
`<|im_end|>`), or after `data.eval.max_new_tokens`.

Decoding is collective: under FSDP2 and ZeRO-3 every forward all-gathers parameters,
so every rank must run the same number of forwards. Prompts are cut into groups of
`train.micro_batch_size` (the same groups at every world size, so the answers do not
depend on it) and dealt round-robin; each rank runs the same number of rounds (a rank
without a group decodes a stand-in whose answer is dropped), and within a round
`generate(synced_gpus=True)` keeps a rank that is done running forwards until every
rank is done (an all-reduced flag per token). The answers are then gathered to every
rank, so every rank computes the same scores.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from trainer.config.schema import Config
from trainer.data.eval_batches import held_out_conversations
from trainer.data.eval_sets import declared_sets
from trainer.eval.scores import set_scores
from trainer.model.sequence_parallel import whole_sequence_attention

log = logging.getLogger("finetrain")

_SENTINEL = "Finetrain sentinel answer."


@dataclasses.dataclass(frozen=True)
class HeldOutPrompt:
    dataset: str
    prompt: str  # the rendered conversation up to the answer, generation prompt included
    question: str  # the last user turn of it, for people to read
    reference: str


def split_last_answer(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(the turns before the last assistant turn, its content); None when nothing precedes it."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    if last == 0:
        return None
    return messages[:last], messages[last]["content"]


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the first token the chat template writes after an assistant turn's content
    (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3): a model trained on chats ends its
    answer with it rather than with EOS."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}],
                                         tokenize=False)
    closing = text[text.index(_SENTINEL) + len(_SENTINEL):].lstrip()
    if closing:
        first = tokenizer(closing, add_special_tokens=False)["input_ids"][0]
        if first not in stops:
            stops.append(first)
    return stops


@torch.no_grad()
def greedy_generate(strategy, prompts: list[list[int]], group_size: int, pad_token_id: int,
                    stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of every prompt (token ids, cut before the first stop token),
    on every rank. Collective: all ranks call it with the same prompts."""
    from transformers import GenerationConfig

    world = strategy.dist.world_size
    groups = [list(range(i, min(i + group_size, len(prompts)))) for i in range(0, len(prompts), group_size)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stop_ids, pad_token_id=pad_token_id)
    model = strategy.unwrapped_model()
    was_training = strategy.model.training
    strategy.model.eval()
    mine: dict[int, list[int]] = {}
    with strategy.generation(), whole_sequence_attention(model):  # one token at a time: nothing to shard
        for round_index in range(-(-len(groups) // world)):
            mine.update(_generate_round(strategy, model, groups, prompts, round_index, config, pad_token_id,
                                        stop_ids, world))
    strategy.model.train(was_training)
    everyone: list[dict] = [mine]
    if world > 1:
        everyone = [{} for _ in range(world)]
        dist.all_gather_object(everyone, mine)
    answers = {i: ids for part in everyone for i, ids in part.items()}
    return [answers[i] for i in range(len(prompts))]


def _generate_round(strategy, model, groups: list[list[int]], prompts: list[list[int]], round_index: int,
                    config, pad_token_id: int, stop_ids: list[int], world: int) -> dict[int, list[int]]:
    """This rank's group of prompts in one round (every rank generates in step with the others)."""
    g = round_index * world + strategy.dist.rank
    members = groups[g] if g < len(groups) else groups[0][:1]  # a stand-in keeps this rank in step
    input_ids, attention_mask = _left_padded([prompts[i] for i in members], pad_token_id)
    with strategy.autocast():
        output = model.generate(input_ids=input_ids.to(strategy.dist.device),
                                attention_mask=attention_mask.to(strategy.dist.device),
                                generation_config=config, synced_gpus=world > 1)
    if g >= len(groups):
        return {}
    return {i: _until_stop(row, stop_ids) for i, row in zip(members, output[:, input_ids.shape[1]:].tolist())}


def _left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, width - len(row):] = 1
    return input_ids, attention_mask


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position]
    return ids


class HeldOutGeneration:
    """The prompts of `data.eval.generate`, answered and scored at every evaluation."""

    def __init__(self, prompts: list[HeldOutPrompt], tokenizer, group_size: int, max_new_tokens: int,
                 metrics: dict[str, tuple[str, ...]] | None = None):
        self.prompts = prompts
        self.metrics = metrics or {}  # per data set, the metrics its answers are scored with (default: all per-answer)
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.prompt_ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in prompts]
        self.stop_ids = stop_token_ids(tokenizer)

    @classmethod
    def from_config(cls, cfg: Config, tokenizer, rank: int, data=None) -> "HeldOutGeneration | None":
        count = cfg.data.eval.generate
        if not count:
            return None
        prompts = []
        for name, conversations in held_out_conversations(cfg, tokenizer, count, data).items():
            split = [s for s in map(split_last_answer, conversations) if s is not None]
            if len(split) < count and rank == 0:
                log.warning("data.eval.generate: %s has %d held-out conversations with a prompt that fit "
                            "data.seq_len; generating for those", name, len(split))
            for messages, reference in split:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
                prompts.append(HeldOutPrompt(name, text, question, reference))
        metrics = {s.name: s.metrics for s in declared_sets(cfg)}
        return cls(prompts, tokenizer, cfg.train.micro_batch_size, cfg.data.eval.max_new_tokens, metrics)

    def run(self, strategy, step: int) -> tuple[dict, list[dict]]:
        """({eval/<dataset>/<metric>: the set's score}, one row per prompt for generations.jsonl,
        with the per-answer scores)."""
        answers = greedy_generate(strategy, self.prompt_ids, self.group_size, self.tokenizer.pad_token_id,
                                  self.stop_ids, self.max_new_tokens)
        generations = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
        rows, results = [], {}
        for name in dict.fromkeys(p.dataset for p in self.prompts):
            members = [i for i, p in enumerate(self.prompts) if p.dataset == name]
            scored, scores = set_scores([generations[i] for i in members], [self.prompts[i].reference for i in members],
                                        self.metrics.get(name, ("rouge_l", "exact_match", "token_f1")))
            results.update({f"eval/{name}/{key}": value for key, value in scores.items()})
            for i, answer_scores in zip(members, scored):
                prompt = self.prompts[i]
                rows.append({"step": step, "dataset": name, "prompt": prompt.prompt, "question": prompt.question,
                             "reference": prompt.reference, "generation": generations[i], **answer_scores})
        return results, rows
