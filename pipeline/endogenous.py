"""Endogenous reward (arXiv:2506.23235): a frozen next-token LLM's logits are a soft Q-function.

Token MDP: s_h = prompt + a_1..a_{h-1}, action a_h = next token, gamma = 1, f(s) = logits at state s.
    Q(s, a) = f(s)[a]
    V(s)    = alpha * logsumexp_a(Q(s, a) / alpha)
    r_h     = Q(s_h, a_h) - V(s_{h+1})            (inverse soft Bellman operator)
    V(s_{H+1}) := 0 after the final token         (the paper's terminal value)
    R       = sum_h r_h = alpha * log pi(y|x) + V(s_1),   pi = softmax(f / alpha)
The same pass yields log pi_ref(a_h | s_h) = f(s_h)[a_h] - logsumexp f(s_h) for the KL penalty.

Forms of the token reward (--reward.form), all from the logits of one packed scoring call:
    raw          r_h = Q(s_h, a_h) - V(s_{h+1})
    centered     c_h = alpha*(log pi(a_h|s_h) + H(pi(.|s_h))) = Q(s_h, a_h) - E_{a~pi}[f(s_h)[a]]
    pmi          p_h = alpha*(log pi(a_h | x, y_<h) - log pi(a_h | x0, y_<h)),  x0 = a prompt without the user's
                 question (the chat template around one user turn holding reward.pmi_prompt, default empty)
    contrastive  k_h = alpha*(log pi(a_h | x+principle, y_<h) - log pi(a_h | x+anti, y_<h)),  the prompt restated
                 under the system prompt reward.principle, then under reward.anti_principle
pmi and contrastive score the response again after the extra contexts (`context_ids`): those rows are packed
into the same forward passes as the rows themselves, and identical contexts (x0 for every row) are held once.

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

FORMS = ("raw", "centered", "pmi", "contrastive")  # the token-reward forms, as in EndoRewardConfig.form
CONTEXTS = {"pmi": 1, "contrastive": 2}  # forms that score the response after extra contexts: how many per row


@dataclasses.dataclass
class EndoRewardConfig:
    alpha: float = opt(1.0, "soft-Q temperature alpha > 0: V = alpha * logsumexp(Q / alpha)")
    system_prompt: str = opt("", "system prompt that conditions the reward on a domain or principle (empty: none)")
    truncated_terminal: Literal["zero", "value"] = opt(
        "zero", "V(s_{H+1}) for a response cut without EOS: zero (paper) or value (the model's real V there)")
    form: Literal["raw", "centered", "pmi", "contrastive"] = opt(
        "raw", "token reward: raw = Q - V(s_{h+1}) (paper); centered = alpha*(log pi(a_h|s_h) + H(pi(.|s_h))), zero-mean "
               "under the model; pmi = alpha*(log pi(a_h|x,y_<h) - log pi(a_h|x0,y_<h)), x0 = no question; contrastive = "
               "alpha*(log pi(a_h|x+principle,y_<h) - log pi(a_h|x+anti_principle,y_<h))")
    pmi_prompt: str = opt("", "form pmi: the user message of the weaker context x0 (chat template, reward.system_prompt, "
                              "then this one user turn; empty: an empty user turn)")
    principle: str = opt("You are a helpful, honest and harmless assistant.",
                         "form contrastive: the system prompt stating the principle")
    anti_principle: str = opt("You are an unhelpful, dishonest and harmful assistant.",
                              "form contrastive: the system prompt stating its opposite")
    normalize: Literal["none", "mean"] = opt("none", "response reward: none = sum of r_h, mean = sum / length")
    truncation: Literal["left", "error"] = opt("left", "prompt+response over the window: left = drop oldest prompt tokens, error = refuse")
    pack_tokens: int = opt(512, "tokens per packed forward pass; attention cost grows with it (512 was fastest on CPU)")
    logit_chunk: int = opt(1024, "positions per LM-head + log-sum-exp chunk (bounds float32 logits memory)")

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"reward.alpha must be > 0, got {self.alpha}. Fix: --reward.alpha 1.0")
        if self.form not in FORMS:
            raise ValueError(f"reward.form {self.form!r} is not one of {list(FORMS)}. Fix: --reward.form raw")
        if self.form == "contrastive":
            for name in ("principle", "anti_principle"):
                if not getattr(self, name).strip():
                    raise ValueError(f"reward.{name} is empty: form contrastive scores the response under the principle "
                                     f"and under its opposite. Fix: --reward.{name} 'You are ...' (a system prompt)")
            if self.principle.strip() == self.anti_principle.strip():
                raise ValueError("reward.principle and reward.anti_principle are the same: the contrastive reward would "
                                 "be 0. Fix: give the opposite principle in --reward.anti_principle")


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
    packed_hidden_states; a pack holds at most `budget` tokens. A group over the budget goes alone, its prompt
    computed once; but if its prompt is short (at most a quarter of the budget) it is split into parts that fit,
    the prompt repeated in each: one short prompt shared by many rows (pmi's x0 is every row's) would otherwise
    make one pack as long as all of them, and attention over a pack costs its length squared."""
    groups = []
    for group in group_by_prompt(prompt_ids):
        p = len(prompt_ids[group[0]])
        parts = pack_by_budget([len(response_ids[i]) for i in group], budget - p) if 4 * p <= budget else [range(len(group))]
        groups += [[group[j] for j in part] for part in parts]
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
def row_statistics(model, prompt_ids: list, response_ids: list, cfg: EndoRewardConfig) -> list[tuple]:
    """Per row, float64 on CPU, over its states s_1..s_{H+1}: (Q(s_h, a_h) for h <= H, V(s), lse f(s), E_pi[f(s)]
    (zeros unless form centered)), from prompt-shared packed forward passes."""
    stats = [None] * len(prompt_ids)
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
            stats[i] = (q[offset:offset + h], v[offset:offset + h + 1], lse[offset:offset + h + 1], mean_f[offset:offset + h + 1])
            offset += h + 1
    return stats


def check_contexts(cfg: EndoRewardConfig, context_ids: list | None, n: int) -> list:
    """Each row's extra contexts as form cfg.form needs them ([] per row for raw and centered)."""
    k = CONTEXTS.get(cfg.form, 0)
    if not k:
        return [[] for _ in range(n)]
    if context_ids is None or len(context_ids) != n or any(len(c) != k for c in context_ids):
        raise ValueError(f"reward.form {cfg.form} scores each response after {k} extra context(s) (pmi: x0; contrastive: "
                         f"the prompt under the principle, then under the anti-principle), but the rows do not carry "
                         f"them. Fix: give each row `context_prompt_ids` from pipeline.chat.context_prompts.")
    return context_ids


@torch.no_grad()
def score_endogenous(model, prompt_ids: list, response_ids: list, finished: list[bool],
                     cfg: EndoRewardConfig, context_ids: list | None = None) -> EndoScores:
    """Endogenous token rewards, response rewards and reference log-probs for each (prompt, response).

    `context_ids[i]`: row i's extra prompts for forms pmi ([x0]) and contrastive ([x+principle, x+anti]); the
    response is scored after each of them in the same packed passes as the rows. The KL reference is always the
    row's own prompt."""
    n = len(prompt_ids)
    contexts = check_contexts(cfg, context_ids, n)
    k = CONTEXTS.get(cfg.form, 0)
    # rows 0..n-1 are the rows; row n*(1+j)+i is row i after its j-th extra context
    stats = row_statistics(model, list(prompt_ids) + [c[j] for j in range(k) for c in contexts],
                           list(response_ids) * (1 + k), cfg)
    token_rewards, ref_logprobs = [None] * n, [None] * n
    rewards = np.zeros(n, dtype=np.float32)
    for i in range(n):
        h = len(response_ids[i])
        q_i, v_i, lse_i, mean_f_i = stats[i]
        if cfg.form == "centered":
            # c_h = alpha*(log pi(a_h|s_h) + H(pi(.|s_h))) = (Q - V(s_h)) + (V(s_h) - E_pi[f(s_h)]) = Q(s_h, a_h) - E_pi[f(s_h)]
            r = q_i - mean_f_i[:h]
        elif cfg.form in ("pmi", "contrastive"):
            plus, minus = (stats[i], stats[n + i]) if cfg.form == "pmi" else (stats[n + i], stats[2 * n + i])
            # pmi:         p_h = alpha*(log pi(a_h|x, y_<h) - log pi(a_h|x0, y_<h)),  alpha*log pi(a|s) = Q(s, a) - V(s)
            # contrastive: k_h = alpha*(log pi(a_h|x+principle, y_<h) - log pi(a_h|x+anti, y_<h))
            r = (plus[0] - plus[1][:h]) - (minus[0] - minus[1][:h])
        else:
            v_next = v_i[1:].clone()  # V(s_{h+1}) for h = 1..H
            if h and (finished[i] or cfg.truncated_terminal == "zero"):
                v_next[-1] = 0.0  # terminal: V(s_{H+1}) := 0
            r = q_i - v_next  # r_h = Q(s_h, a_h) - V(s_{h+1})
        token_rewards[i] = r.float().numpy()
        ref_logprobs[i] = (q_i - lse_i[:h]).float().numpy()  # log pi_ref(a_h|s_h) = f[a_h] - lse(f)
        total = r.sum().item()
        rewards[i] = total / max(h, 1) if cfg.normalize == "mean" else total
    return EndoScores(token_rewards, ref_logprobs, rewards)
