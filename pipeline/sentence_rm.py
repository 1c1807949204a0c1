"""Trained reward models: the sentence-level RM (arXiv:2503.04793, DESIGN.md section 3) and two baselines.

Sentence RM input, token by token (E = the boundary marker <END>, a special token added to the tokenizer):

    prompt E s_1 E s_2 E ... s_K E EOS E
           j=0  j=1      ...          j=K      <- the markers whose hidden states h_j are read

h_0 is the marker after the prompt, h_k (1 <= k < K) the marker after sentence k, and h_K the FINAL marker,
after EOS: the last marker, as the query q = W_q h_K asks. The marker between s_K and EOS is in the input (the
text format of the paper) but its hidden state is not read; sentence K's value difference r_K = v_K - v_{K-1}
therefore covers s_K and the EOS. An empty response has K = 1, a "sentence" that is EOS alone.

    v_j = w . h_j + b                                   (scalar value head)
    r_0 = v_0,  r_k = v_k - v_{k-1}                     (sentence rewards)
    a_j = softmax_j(RoPE(W_q h_K, K) . RoPE(W_k h_j, j) / sqrt(d))    (rotary over the sentence index j)
    R = sum_j a_j r_j                                   (response score)

Baselines, trained the same way on prompt + response + EOS (no markers): ResponseRewardModel (head on the final
token) and TokenRewardModel (mean of per-token values over the response tokens and EOS). All three take the same
batch dict (see collate_rm_inputs) and return a RewardOutput whose `score` is R [B].
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import from_dict, opt, to_yaml
from pipeline.segment import align_sentences, split_sentences, tokenize_with_offsets

BOUNDARY_TOKEN = "<END>"
ROPE_BASE = 10000.0
HEADS_FILE = "reward_heads.safetensors"
CONFIG_FILE = "reward_model.yaml"


@dataclasses.dataclass
class RewardModelConfig:
    kind: Literal["sentence", "response", "token"] = opt("sentence", "sentence-level RM, or a baseline: head on "
                                                         "the final token (response) or mean over tokens (token)")
    attn_dim: int = opt(128, "d of the sentence RM's single attention head (even: rotary pairs dimensions)")
    splitter: str = opt("pysbd", "sentence splitter: pysbd (rule-based) or newline; see pipeline.segment.SPLITTERS")
    freeze_layers: int = opt(0, "freeze the embeddings and the lowest N transformer layers (0 = train all); "
                                "the boundary marker's embedding always trains")


@dataclasses.dataclass
class RewardOutput:
    score: torch.Tensor                        # R [B], the response score
    values: torch.Tensor                       # [B, J]: v_j at markers (sentence), v_t (token), R (response)
    mask: torch.Tensor                         # [B, J] bool: which entries of `values` are real
    rewards: torch.Tensor | None = None        # [B, K+1] sentence rewards r_j (sentence RM only), 0 on padding
    attention: torch.Tensor | None = None      # [B, K+1] a_j (sentence RM only), 0 on padding


# ---------------------------------------------------------------- inputs

def add_boundary_token(tokenizer, model) -> int:
    """Add <END> to the tokenizer as a special token, grow the model's embeddings to match; returns its id."""
    tokenizer.add_tokens([BOUNDARY_TOKEN], special_tokens=True)  # a no-op when already there
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN)


def build_sentence_rm_input(prompt_ids, response_text: str, tokenizer, boundary_id: int,
                            splitter: str = "pysbd") -> dict:
    """One sentence-RM example: prompt E s_1 E ... s_K E EOS E (see the module docstring).

    Returns input_ids, response_mask (1 on response tokens and EOS), boundary_positions (K + 1 positions in
    input_ids of the markers h_0..h_K), sentence_ends (K indices into response_ids: the last token of each
    sentence, where RL puts sentence k's dense reward; for the empty response [0], the EOS after no tokens),
    response_ids (the response tokenized alone, no EOS) and sentence_spans (character spans, merged where a
    sentence shares its last token with the next; see pipeline.segment.align_sentences).

    In RL, sentence_ends index the policy's response tokens only when those equal response_ids (the text
    decoded from them, tokenized again); the caller checks that.
    """
    response_ids, offsets = tokenize_with_offsets(response_text, tokenizer)
    spans = split_sentences(response_text, splitter) or ([(0, len(response_text))] if response_ids else [])
    sentence_spans, token_spans = align_sentences(response_text, spans, offsets)

    input_ids = list(prompt_ids) + [boundary_id]
    response_mask = [0] * len(input_ids)
    boundary_positions = [len(input_ids) - 1]  # j = 0: end of the prompt
    for first, last in token_spans:
        input_ids += response_ids[first:last] + [boundary_id]
        response_mask += [1] * (last - first) + [0]
        boundary_positions.append(len(input_ids) - 1)
    input_ids += [tokenizer.eos_token_id, boundary_id]
    response_mask += [1, 0]
    if token_spans:
        boundary_positions[-1] = len(input_ids) - 1  # h_K is the final marker, after EOS
    else:
        boundary_positions.append(len(input_ids) - 1)  # empty response: K = 1, the sentence is the EOS
        sentence_spans = [(0, len(response_text))]
    sentence_ends = [last - 1 for _, last in token_spans] or [0]
    return {"input_ids": input_ids, "response_mask": response_mask, "boundary_positions": boundary_positions,
            "sentence_ends": sentence_ends, "response_ids": response_ids, "sentence_spans": sentence_spans}


def build_plain_rm_input(prompt_ids, response_text: str, tokenizer) -> dict:
    """One baseline-RM example: prompt, response tokens, EOS (no markers)."""
    response_ids, _ = tokenize_with_offsets(response_text, tokenizer)
    input_ids = list(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    response_mask = [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)
    return {"input_ids": input_ids, "response_mask": response_mask, "response_ids": response_ids}


def build_rm_input(kind: str, prompt_ids, response_text: str, tokenizer, boundary_id: int | None = None,
                   splitter: str = "pysbd") -> dict:
    """The example format that reward model `kind` reads."""
    if kind == "sentence":
        return build_sentence_rm_input(prompt_ids, response_text, tokenizer, boundary_id, splitter)
    return build_plain_rm_input(prompt_ids, response_text, tokenizer)


def pad(values: list, width: int, fill) -> list:
    return list(values) + [fill] * (width - len(values))


def collate_rm_inputs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: input_ids, attention_mask, response_mask [B, T]; for sentence-RM
    examples also boundary_positions, boundary_mask [B, K_max + 1] and sentence_ends [B, K_max] (0 on padding)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.tensor([pad(e["input_ids"], length, pad_id) for e in examples]),
             "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), length, 0) for e in examples]),
             "response_mask": torch.tensor([pad(e["response_mask"], length, 0) for e in examples])}
    if all("boundary_positions" in e for e in examples):
        markers = max(len(e["boundary_positions"]) for e in examples)
        batch["boundary_positions"] = torch.tensor([pad(e["boundary_positions"], markers, 0) for e in examples])
        batch["boundary_mask"] = torch.tensor([pad([True] * len(e["boundary_positions"]), markers, False)
                                               for e in examples])
        batch["sentence_ends"] = torch.tensor([pad(e["sentence_ends"], markers - 1, 0) for e in examples])
    return batch


# ---------------------------------------------------------------- models

def apply_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE: rotate dimension pairs (i, i + d/2) of x [..., d] by angle position * ROPE_BASE^(-2i/d)."""
    half = x.shape[-1] // 2
    frequencies = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.to(torch.float32)[..., None] * frequencies
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)


class BackboneRewardModel(nn.Module):
    """A transformer backbone (no LM head) whose last hidden states feed a small float32 head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone.base_model  # AutoModelForCausalLM -> its transformer; AutoModel -> itself
        self.hidden_size = self.backbone.config.hidden_size

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H], float32."""
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return output.last_hidden_state.float()


class SentenceRewardModel(BackboneRewardModel):
    """Backbone + value head v_j at each marker + one attention head over sentences; R = sum_j a_j r_j."""

    def __init__(self, backbone, boundary_id: int, attn_dim: int = 128):
        super().__init__(backbone)
        if attn_dim <= 0 or attn_dim % 2:
            raise ValueError(f"attn_dim must be a positive even number (rotary pairs dimensions), got {attn_dim}.")
        self.boundary_id = boundary_id
        self.attn_dim = attn_dim
        self.value_head = nn.Linear(self.hidden_size, 1)                # v = w . h + b
        self.query = nn.Linear(self.hidden_size, attn_dim, bias=False)  # q = W_q h_K
        self.key = nn.Linear(self.hidden_size, attn_dim, bias=False)    # k_j = W_k h_j
        # The marker's embedding is its own parameter so that it trains even when the embeddings are frozen;
        # save_reward_model writes it back into the embedding matrix.
        embedding_row = self.backbone.get_input_embeddings().weight[boundary_id]
        self.boundary_embedding = nn.Parameter(embedding_row.detach().clone())

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        is_marker = (input_ids == self.boundary_id)[..., None]
        embeddings = torch.where(is_marker, self.boundary_embedding.to(embeddings.dtype), embeddings)
        output = self.backbone(inputs_embeds=embeddings, attention_mask=attention_mask)
        return output.last_hidden_state.float()

    def forward(self, batch: dict[str, torch.Tensor]) -> RewardOutput:
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
        return self.score_markers(hidden, batch["boundary_positions"], batch["boundary_mask"])

    def score_markers(self, hidden: torch.Tensor, boundary_positions: torch.Tensor,
                      boundary_mask: torch.Tensor) -> RewardOutput:
        """The sentence-RM head on hidden states [B, T, H] at markers [B, J] (J = K_max + 1, mask for ragged K)."""
        mask = boundary_mask.bool()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[rows[:, None], boundary_positions]                       # h_j [B, J, H]
        values = self.value_head(h).squeeze(-1).masked_fill(~mask, 0.0)     # v_j = w . h_j + b
        previous = F.pad(values[:, :-1], (1, 0))                            # v_{j-1}, with v_{-1} := 0
        rewards = (values - previous).masked_fill(~mask, 0.0)               # r_0 = v_0, r_k = v_k - v_{k-1}
        last = mask.sum(dim=1) - 1                                          # K per example
        sentence_index = torch.arange(h.shape[1], device=h.device)
        q = apply_rotary(self.query(h[rows, last]), last)                   # q = RoPE(W_q h_K, K)
        k = apply_rotary(self.key(h), sentence_index)                       # k_j = RoPE(W_k h_j, j)
        logits = (k @ q[:, :, None]).squeeze(-1) / math.sqrt(self.attn_dim)  # q . k_j / sqrt(d)
        attention = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # a_j
        score = (attention * rewards).sum(dim=-1)                           # R = sum_j a_j r_j
        return RewardOutput(score=score, values=values, mask=mask, rewards=rewards, attention=attention)

    def dense_rewards(self, output: RewardOutput, sentence_ends: torch.Tensor, response_length: int) -> torch.Tensor:
        """RL rewards [B, response_length]: a_k r_k on the last token of sentence k (k >= 1), zero elsewhere.

        The prompt term a_0 r_0 = a_0 v_0 is added to sentence 1's reward, so each row sums to R exactly.
        sentence_ends [B, K_max] comes from collate_rm_inputs (indices into the response tokens).
        """
        weighted = output.attention * output.rewards                        # a_j r_j, 0 on padding
        per_sentence = weighted[:, 1:].clone()
        per_sentence[:, 0] += weighted[:, 0]                                # fold a_0 r_0 into sentence 1
        dense = torch.zeros(weighted.shape[0], response_length, device=weighted.device)
        return dense.scatter_add(1, sentence_ends.clamp(0, response_length - 1), per_sentence)


class ResponseRewardModel(BackboneRewardModel):
    """Baseline: R = w . h_T + b on the final token (the EOS)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.value_head = nn.Linear(self.hidden_size, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> RewardOutput:
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        positions = torch.arange(mask.shape[1], device=mask.device)
        final = (positions * mask).argmax(dim=1)                            # last real token, any padding side
        h_final = hidden[torch.arange(hidden.shape[0], device=hidden.device), final]
        score = self.value_head(h_final).squeeze(-1)                        # R = w . h_T + b
        return RewardOutput(score=score, values=score[:, None], mask=torch.ones_like(score, dtype=torch.bool)[:, None])


class TokenRewardModel(BackboneRewardModel):
    """Baseline: v_t = w . h_t + b per token; R = mean of v_t over the response tokens (and EOS)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.value_head = nn.Linear(self.hidden_size, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> RewardOutput:
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
        mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
        values = self.value_head(hidden).squeeze(-1).masked_fill(~mask, 0.0)  # v_t = w . h_t + b
        score = values.sum(dim=1) / mask.sum(dim=1).clamp(min=1)            # R = mean_t v_t
        return RewardOutput(score=score, values=values, mask=mask)


def freeze_lower_layers(backbone, num_layers: int) -> None:
    """Freeze the input embeddings and the lowest `num_layers` transformer blocks (0: freeze nothing)."""
    if num_layers <= 0:
        return
    blocks = next(m for m in backbone.modules() if isinstance(m, nn.ModuleList))  # layers / h / blocks
    if num_layers > len(blocks):
        raise ValueError(f"freeze_layers={num_layers} but the backbone has only {len(blocks)} layers.")
    backbone.get_input_embeddings().weight.requires_grad_(False)
    for block in blocks[:num_layers]:
        block.requires_grad_(False)


def build_reward_model(kind: Literal["sentence", "response", "token"], backbone, boundary_id: int | None = None,
                       attn_dim: int = 128, freeze_layers: int = 0) -> BackboneRewardModel:
    """A reward model of `kind` on a loaded HF backbone (AutoModel or AutoModelForCausalLM)."""
    if kind == "sentence":
        if boundary_id is None:
            raise ValueError("the sentence RM needs boundary_id: call add_boundary_token(tokenizer, backbone) first.")
        model = SentenceRewardModel(backbone, boundary_id, attn_dim)
    elif kind == "response":
        model = ResponseRewardModel(backbone)
    elif kind == "token":
        model = TokenRewardModel(backbone)
    else:
        raise ValueError(f"unknown reward model kind {kind!r}; choose one of ['response', 'sentence', 'token'].")
    freeze_lower_layers(model.backbone, freeze_layers)
    return model


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(R_chosen - R_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# ---------------------------------------------------------------- save / load

def save_reward_model(model: BackboneRewardModel, tokenizer, out_dir: str, config: RewardModelConfig) -> None:
    """Backbone and tokenizer via save_pretrained, the heads as safetensors, the config as YAML."""
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(model, SentenceRewardModel):  # the trained marker embedding goes back into the matrix
        with torch.no_grad():
            model.backbone.get_input_embeddings().weight[model.boundary_id] = model.boundary_embedding
    model.backbone.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    heads = {name: p.detach().cpu().contiguous() for name, p in model.state_dict().items()
             if not name.startswith("backbone.")}
    save_file(heads, os.path.join(out_dir, HEADS_FILE))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as fh:
        fh.write(to_yaml(config))


def load_reward_model(out_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, config) from a folder written by save_reward_model; the model is in eval mode."""
    from transformers import AutoModel

    from pipeline.models import load_tokenizer

    with open(os.path.join(out_dir, CONFIG_FILE)) as fh:
        config = from_dict(RewardModelConfig, yaml.safe_load(fh) or {})
    tokenizer = load_tokenizer(out_dir)
    backbone = AutoModel.from_pretrained(out_dir, dtype=dtype)
    boundary_id = tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN) if config.kind == "sentence" else None
    model = build_reward_model(config.kind, backbone, boundary_id, config.attn_dim, config.freeze_layers)
    result = model.load_state_dict(load_file(os.path.join(out_dir, HEADS_FILE)), strict=False)
    missing_heads = [name for name in result.missing_keys if not name.startswith("backbone.")]
    if missing_heads or result.unexpected_keys:
        raise ValueError(f"{out_dir}/{HEADS_FILE} does not match a {config.kind} reward model: missing "
                         f"{missing_heads}, unexpected {result.unexpected_keys}.")
    return model.to(device).eval(), tokenizer, config
