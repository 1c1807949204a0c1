"""Endogenous reward (arXiv:2506.23235): a frozen next-token LLM's logits are a soft Q-function.

Token MDP: s_h = prompt + a_1..a_{h-1}, action a_h = next token, gamma = 1, f(s) = logits at state s.
    Q(s, a) = f(s)[a]
    V(s)    = alpha * logsumexp_a(Q(s, a) / alpha)
    r_h     = Q(s_h, a_h) - V(s_{h+1})            (inverse soft Bellman operator)
    V(s_{H+1}) := 0 after the final token         (the paper's terminal value)
    R       = sum_h r_h = alpha * log pi(y|x) + V(s_1),   pi = softmax(f / alpha)
The same pass yields log pi_ref(a_h | s_h) = f(s_h)[a_h] - logsumexp f(s_h) for the KL penalty.

Packing: rows that share a prompt (a preference pair's chosen and rejected; the n RL samples of a prompt) are
one segment, the prompt once followed by each response; segments are packed into forward passes with no
padding. A tree-shaped attention mask lets each response see its prompt and itself only, and position ids
restart per segment and continue from the prompt in every response, so every token gets exactly the hidden
state of its own unpacked sequence while the prompt is computed once. The LM head and the float32
log-sum-exp run only at the positions that predict a response token, plus the one after the last token.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from pipeline.config import opt


@dataclasses.dataclass
class EndoRewardConfig:
    alpha: float = opt(1.0, "soft-Q temperature alpha > 0: V = alpha * logsumexp(Q / alpha)")
    system_prompt: str = opt("", "system prompt that conditions the reward on a domain or principle (empty: none)")
    truncated_terminal: Literal["zero", "value"] = opt(
        "zero", "V(s_{H+1}) for a response cut without EOS: zero (paper) or value (the model's real V there)")
    form: Literal["raw", "centered"] = opt(
        "raw", "token reward: raw = Q - V(s_{h+1}) (paper); centered = alpha*(log pi(a_h|s_h) + H(pi(.|s_h))), zero-mean under the model")
    normalize: Literal["none", "mean"] = opt("none", "response reward: none = sum of r_h, mean = sum / length")
    truncation: Literal["left", "error"] = opt("left", "prompt+response over the window: left = drop oldest prompt tokens, error = refuse")
    pack_tokens: int = opt(512, "tokens per packed forward pass; attention cost grows with it (512 was fastest on CPU)")
    logit_chunk: int = opt(1024, "positions per LM-head + log-sum-exp chunk (bounds float32 logits memory)")

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"reward.alpha must be > 0, got {self.alpha}. Fix: --reward.alpha 1.0")


@dataclasses.dataclass
class EndoScores:
    token_rewards: list[np.ndarray]   # r_h per response token
    ref_logprobs: list[np.ndarray]    # log pi_ref(a_h | s_h), temperature 1
    rewards: np.ndarray               # response reward R (sum, or mean if normalised)


def pack_by_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group item indices, in order, into packs of at most `budget` tokens (a longer one goes alone)."""
    packs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def group_by_prompt(prompt_ids: list) -> list[list[int]]:
    """Row indices grouped by identical prompt, groups in order of first appearance."""
    groups: dict[bytes, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(np.asarray(p, dtype=np.int64).tobytes(), []).append(i)
    return list(groups.values())


def prompt_shared_packs(prompt_ids: list, response_ids: list, budget: int):
    """The forward passes of prompt-shared packing: yields (groups, segments) per pack, where groups are the row
    indices that share a prompt, in packed order, and segments their (prompt, [responses]) for
    packed_hidden_states; a pack holds at most `budget` tokens (a larger group goes alone)."""
    groups = group_by_prompt(prompt_ids)
    sizes = [len(prompt_ids[g[0]]) + sum(len(response_ids[i]) for i in g) for g in groups]
    for pack in pack_by_budget(sizes, budget):
        pack_groups = [groups[g] for g in pack]
        yield pack_groups, [(np.asarray(prompt_ids[g[0]]), [np.asarray(response_ids[i]) for i in g]) for g in pack_groups]


def prompt_shared_inputs(segments: list[tuple[np.ndarray, list[np.ndarray]]], device) -> tuple[torch.Tensor, ...]:
    """(input_ids [1, N], position_ids [1, N], attention mask [1, 1, N, N]) of (prompt, [responses]) segments packed
    into one sequence, no padding.

    Layout: prompt_1, responses of 1 ..., prompt_2, ... A response attends to its own prompt and to itself
    (tree mask); its position ids continue from the prompt, as if it were alone after that prompt.
    """
    tokens, positions, segment_of, branch_of = [], [], [], []
    for s, (prompt, responses) in enumerate(segments):
        tokens.append(prompt)
        positions.append(np.arange(len(prompt)))
        segment_of.append(np.full(len(prompt), s))
        branch_of.append(np.full(len(prompt), -1))  # -1: the shared prompt
        for b, response in enumerate(responses):
            tokens.append(response)
            positions.append(np.arange(len(prompt), len(prompt) + len(response)))
            segment_of.append(np.full(len(response), s))
            branch_of.append(np.full(len(response), b))
    segment = torch.from_numpy(np.concatenate(segment_of)).to(device)
    branch = torch.from_numpy(np.concatenate(branch_of)).to(device)
    index = torch.arange(len(segment), device=device)
    # query q may attend to key k: same segment, k not after q, and k is prompt or on q's own branch
    allowed = ((segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
               & ((branch[None, :] == -1) | (branch[None, :] == branch[:, None])))
    input_ids = torch.from_numpy(np.concatenate(tokens).astype(np.int64)).to(device)[None]
    position_ids = torch.from_numpy(np.concatenate(positions)).to(device)[None]
    return input_ids, position_ids, allowed[None, None]


def packed_hidden_states(model, segments: list[tuple[np.ndarray, list[np.ndarray]]]) -> torch.Tensor:
    """Last hidden states [T, d] of (prompt, [responses]) segments packed into one forward pass (prompt_shared_inputs)."""
    input_ids, position_ids, allowed = prompt_shared_inputs(segments, model.device)
    out = model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed, use_cache=False)
    return out.last_hidden_state[0]


def head_statistics(model, hidden: torch.Tensor, targets: torch.Tensor, alpha: float, chunk: int, expected_f: bool = False):
    """At each row of `hidden`: Q of its target token, V = alpha*lse(f/alpha), lse(f) and (if `expected_f`, else
    zeros: it costs a vocabulary-wide softmax) E_pi[f], all float32."""
    lm_head = model.get_output_embeddings()
    q, v, lse, mean_f = [], [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start:start + chunk]).float()  # float32 even when the model runs in bf16
        lse_1 = torch.logsumexp(logits, dim=-1)
        q.append(logits.gather(-1, targets[start:start + chunk, None]).squeeze(-1))
        v.append(lse_1 if alpha == 1.0 else alpha * torch.logsumexp(logits / alpha, dim=-1))  # V(s) = alpha*lse(Q/alpha)
        lse.append(lse_1)
        mean_f.append((torch.softmax(logits / alpha, dim=-1) * logits).sum(-1) if expected_f  # E_{a~pi}[f(s)[a]], pi = softmax(f/alpha)
                      else torch.zeros_like(lse_1))
    return torch.cat(q), torch.cat(v), torch.cat(lse), torch.cat(mean_f)


@torch.no_grad()
def score_endogenous(model, prompt_ids: list, response_ids: list, finished: list[bool],
                     cfg: EndoRewardConfig) -> EndoScores:
    """Endogenous token rewards, response rewards and reference log-probs for each (prompt, response)."""
    n = len(prompt_ids)
    token_rewards, ref_logprobs = [None] * n, [None] * n
    rewards = np.zeros(n, dtype=np.float32)
    for pack_groups, segments in prompt_shared_packs(prompt_ids, response_ids, cfg.pack_tokens):
        hidden = packed_hidden_states(model, segments)
        # Logits at position t predict token t+1. States s_1..s_{H+1} of a response: the prompt's last token
        # (s_1, shared by the group), then each response token (s_{h+1} follows a_h).
        rows, targets, order, start = [], [], [], 0
        for group in pack_groups:
            p = len(prompt_ids[group[0]])
            response_start = start + p
            for i in group:
                h = len(response_ids[i])
                rows.append(torch.cat([torch.tensor([start + p - 1]), torch.arange(response_start, response_start + h)]))
                targets.append(torch.cat([torch.as_tensor(np.array(response_ids[i], dtype=np.int64)),
                                          torch.zeros(1, dtype=torch.long)]))  # no action after the last state
                order.append(i)
                response_start += h
            start = response_start
        rows_t = torch.cat(rows).to(hidden.device)
        q, v, lse, mean_f = head_statistics(model, hidden[rows_t], torch.cat(targets).to(hidden.device), cfg.alpha, cfg.logit_chunk,
                                            expected_f=cfg.form == "centered")
        q, v, lse, mean_f = q.cpu().double(), v.cpu().double(), lse.cpu().double(), mean_f.cpu().double()
        offset = 0
        for i in order:
            h = len(response_ids[i])
            q_i, v_i, lse_i = q[offset:offset + h], v[offset:offset + h + 1], lse[offset:offset + h]
            offset += h + 1
            v_next = v_i[1:].clone()  # V(s_{h+1}) for h = 1..H
            if h and (finished[i] or cfg.truncated_terminal == "zero"):
                v_next[-1] = 0.0  # terminal: V(s_{H+1}) := 0
            if cfg.form == "centered":
                # c_h = alpha*(log pi(a_h|s_h) + H(pi(.|s_h))) = (Q - V(s_h)) + (V(s_h) - E_pi[f(s_h)]) = Q(s_h, a_h) - E_pi[f(s_h)]
                r = q_i - mean_f[offset - h - 1:offset - 1]
            else:
                r = q_i - v_next  # r_h = Q(s_h, a_h) - V(s_{h+1})
            token_rewards[i] = r.float().numpy()
            ref_logprobs[i] = (q_i - lse_i).float().numpy()  # log pi_ref(a_h|s_h) = f[a_h] - lse(f)
            total = r.sum().item()
            rewards[i] = total / max(h, 1) if cfg.normalize == "mean" else total
    return EndoScores(token_rewards, ref_logprobs, rewards)
