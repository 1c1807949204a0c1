"""Training a reward model on preference pairs, the parts without Ray or DeepSpeed.

    pairs (PAIRS_SCHEMA) --encode_pairs--> chosen / rejected examples in the format of the RM kind
    shard_indices, epoch_steps      which pairs a worker trains on, step by step (deterministic)
    pair_loss                       both sides through the model in one batch; -log sigmoid(R_chosen - R_rejected)
    score_examples, accuracy_by_subset, evaluate_pairs    pairwise accuracy per subset (pipeline.evaluation)

Truncation to `max_length` tokens (per side, markers included), the policy of pipeline.chat.fit_to_window:
drop the oldest prompt tokens first (keeping at least one); if the response alone still does not fit, keep the
longest prefix of its text (in whole tokens) whose example fits (the sentence RM's markers move with the cut).
A cut response still ends with EOS (and the final marker), so every RM reads the layout it was trained on.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pyarrow as pa
import torch

from pipeline.chat import encode_prompt
from pipeline.evaluation import accuracy_table
from pipeline.segment import tokenize_with_offsets
from pipeline.sentence_rm import bradley_terry_loss, build_rm_input, collate_rm_inputs

HELDOUT = "heldout"  # the subset name of the held-out pairs in every table


@dataclasses.dataclass
class EncodedPairs:
    chosen: list[dict]      # one build_rm_input example per pair
    rejected: list[dict]
    subsets: list[str]      # the pair's subset (for per-subset accuracy)
    truncated: int          # how many sides (chosen or rejected) were cut to fit max_length

    def __len__(self) -> int:
        return len(self.chosen)


# ---------------------------------------------------------------- encoding

def encode_side(kind: str, prompt_ids: list[int], response: str, tokenizer, boundary_id: int | None,
                splitter: str, max_length: int, where: str = "pair") -> tuple[dict, bool]:
    """(one RM example of at most max_length tokens, whether it had to be truncated)."""
    def build(prompt: list[int], text: str) -> dict:
        return build_rm_input(kind, prompt, text, tokenizer, boundary_id, splitter)

    example = build(prompt_ids, response)
    overflow = len(example["input_ids"]) - max_length
    if overflow <= 0:
        return example, False
    prompt_ids = prompt_ids[min(overflow, len(prompt_ids) - 1):]  # drop the oldest prompt tokens, keep one
    example = build(prompt_ids, response)
    if len(example["input_ids"]) <= max_length:
        return example, True
    # keep the longest prefix of the response (in whole tokens) that fits; binary search over the prefix
    # length, with `fits` always a prefix that fits and `too_long` one that does not
    _, offsets = tokenize_with_offsets(response, tokenizer)
    prefixes = [""] + [response[:end] for _, end in offsets]
    fits, too_long = 0, len(offsets)
    if len(build(prompt_ids, "")["input_ids"]) > max_length:
        raise ValueError(f"{where}: even one prompt token and an empty response need more than max_length "
                         f"{max_length} tokens. Fix: raise --train.max_length.")
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if len(build(prompt_ids, prefixes[middle])["input_ids"]) <= max_length:
            fits = middle
        else:
            too_long = middle
    return build(prompt_ids, prefixes[fits]), True


def encode_pairs(pairs: pa.Table, tokenizer, kind: str, boundary_id: int | None = None, splitter: str = "pysbd",
                 max_length: int = 1024, system_prompt: str = "") -> EncodedPairs:
    """Both sides of every pair in the input format of reward model `kind`, each cut to max_length tokens."""
    chosen, rejected, truncated = [], [], 0
    for pair_id, messages, chosen_text, rejected_text in zip(
            pairs["pair_id"].to_pylist(), pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(),
            pairs["rejected"].to_pylist()):
        prompt_ids = encode_prompt(tokenizer, messages, system_prompt)
        for side, text, out in (("chosen", chosen_text, chosen), ("rejected", rejected_text, rejected)):
            example, cut = encode_side(kind, prompt_ids, text, tokenizer, boundary_id, splitter, max_length,
                                       where=f"pair {pair_id} ({side})")
            out.append(example)
            truncated += cut
    return EncodedPairs(chosen, rejected, pairs["subset"].to_pylist(), truncated)


# ---------------------------------------------------------------- which pairs, in which order

def shard_indices(num_pairs: int, world_size: int, rank: int, seed: int) -> list[int]:
    """This worker's pairs: entries rank, rank + world_size, ... of a seeded permutation of the pairs, cut to
    num_pairs // world_size so that every worker runs the same number of steps (ZeRO's collectives need it);
    the at most world_size - 1 pairs left over are not trained on."""
    order = list(range(num_pairs))
    random.Random(seed).shuffle(order)
    return order[rank::world_size][:num_pairs // world_size]


def epoch_steps(num_pairs: int, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Optimizer steps of one epoch over positions 0..num_pairs-1 (reshuffled per epoch): each step is a list of
    up to grad_accum micro-batches of up to batch_size positions. Depends only on its arguments, so every
    worker with the same shard size gets the same shape of plan."""
    order = list(range(num_pairs))
    random.Random(f"seed {seed} epoch {epoch}").shuffle(order)
    micro_batches = [order[i:i + batch_size] for i in range(0, num_pairs, batch_size)]
    return [micro_batches[i:i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]


# ---------------------------------------------------------------- the Bradley-Terry step

def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def pair_loss(model, chosen: list[dict], rejected: list[dict], pad_id: int, device="cpu") -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss of a batch of pairs and its metrics; both sides go through `model` as one batch.

    loss = mean_i -log sigmoid(R(chosen_i) - R(rejected_i))
    """
    batch = to_device(collate_rm_inputs(chosen + rejected, pad_id), device)
    score = model(batch).score.float()
    r_chosen, r_rejected = score[:len(chosen)], score[len(chosen):]
    loss = bradley_terry_loss(r_chosen, r_rejected)
    margin = (r_chosen - r_rejected).detach()
    return loss, {"loss": loss.item(), "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def score_examples(model, chosen: list[dict], rejected: list[dict], batch_size: int, pad_id: int,
                   device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """R of every chosen and rejected example (float64 arrays), batch_size pairs per forward pass; the pairs are
    batched in order of length (little padding) and the scores put back in the input order."""
    lengths = [max(len(c["input_ids"]), len(r["input_ids"])) for c, r in zip(chosen, rejected)]
    order = np.argsort(lengths, kind="stable")
    chosen_scores, rejected_scores = np.zeros(len(chosen)), np.zeros(len(chosen))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate_rm_inputs([chosen[i] for i in rows] + [rejected[i] for i in rows], pad_id)
        score = model(to_device(batch, device)).score.double().cpu().numpy()
        chosen_scores[rows], rejected_scores[rows] = score[:len(rows)], score[len(rows):]
    return chosen_scores, rejected_scores


def accuracy_by_subset(subsets: list[str], chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """{subset: pairwise accuracy, ..., "overall": accuracy over all pairs}; a tie counts half."""
    return accuracy_table(np.array(subsets), {"rm": (chosen, rejected)})["rm"]


def evaluate_pairs(model, encoded: EncodedPairs, batch_size: int, pad_id: int, device="cpu") -> dict[str, float]:
    """Pairwise accuracy of `model` per subset of `encoded` (in one process; the job shards it over workers)."""
    chosen, rejected = score_examples(model, encoded.chosen, encoded.rejected, batch_size, pad_id, device)
    return accuracy_by_subset(encoded.subsets, chosen, rejected)
