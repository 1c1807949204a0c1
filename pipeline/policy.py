"""What the learners compute: policy log-probs, PPO + KL + entropy loss, critic values and value loss.

Pure torch: no Ray, no DeepSpeed. `model` is anything called like a Hugging Face model (the HF model itself
or the DeepSpeed engine wrapping it; the engine must be called, not bypassed, so its gradient hooks run).

Batch layout: right padding. Row i is prompt_i + response_i, padded on the right to the longest row, with
an attention mask. Positions count from 0 in every row, so padding at the end never changes a real token's
output (causal attention) and no position ids are needed. Logits at position t predict token t+1: response
token j of row i sits at position P_i + j and is predicted at position P_i + j - 1 (P_i = prompt length).
The LM head runs only from the first such position on (`logits_to_keep`), then every row gathers its own
columns into a [B, T] response grid (T = longest response). Log-softmax and entropy are float32.

Precision: the models hold float32 weights; a bf16 learner calls these functions inside
`pipeline.precision.autocast("bfloat16", device)`, so matmuls run in bf16 while the gradients and the
optimizer's update land on the float32 weights (an lr-sized step that bf16 weights would round away).

Critic: AutoModelForTokenClassification(num_labels=1) loaded from the policy's folder: the same backbone
plus a fresh linear head (classifier dropout off). Its output at position P_i + j - 1 is V(s_j), the value of
the state just before response token j, the same position whose logits predict token j.

KL to the reference has two homes (`LearnerConfig.kl_mode`):
  k1_reward: r'_t = r_t - kl_coef * (log pi_old - log pi_ref) on the token rewards, before the advantages
             (`pipeline/experience.py: build_experience`); the loss itself has no KL term.
  k3_loss:   loss += kl_coef * mean_t k3(pi_theta, pi_ref), with gradient (Schulman's k3 estimator).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch

from pipeline.advantages import masked_mean
from pipeline.arrow import ragged_to_padded
from pipeline.config import opt
from pipeline.losses import entropy_from_logits, kl_k1, kl_k3, ppo_clip_loss, token_logprobs, value_loss
from pipeline.precision import DType


@dataclasses.dataclass
class LearnerConfig:
    ranks: int = opt(2, "DeepSpeed data-parallel ranks (one Ray actor each)")
    zero_stage: int = opt(2, "ZeRO stage 0..3 (3 shards the weights; 2 shards gradients and optimizer state)")
    dtype: DType = opt("auto", "compute precision; weights and AdamW state are always float32, bfloat16 runs the "
                               "forward and loss under autocast (auto: bf16 on a GPU or a CPU with avx512_bf16/"
                               "amx_bf16, else float32; resolved on each rank's node)")
    lr: float = opt(1e-6, "policy learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up")
    lr_schedule: Literal["constant", "cosine"] = opt("constant", "after warm-up: constant, or cosine decay to 0")
    total_steps: int = opt(0, "optimizer steps for the cosine schedule (set by the RL job: iterations x ppo_epochs)")
    micro_batch_size: int = opt(4, "rows per forward pass; gradient accumulation = rows per rank / micro batch")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    clip_eps: float = opt(0.2, "PPO ratio clip epsilon")
    ppo_epochs: int = opt(1, "passes over each batch; one optimizer step per pass")
    kl_coef: float = opt(0.05, "weight of the KL penalty to the frozen reference model")
    kl_mode: Literal["k1_reward", "k3_loss"] = opt(
        "k3_loss", "k1_reward: subtract kl_coef*(logp_old - ref_logp) from token rewards; k3_loss: add kl_coef*k3 to the loss")
    entropy_coef: float = opt(0.0, "entropy bonus: loss -= entropy_coef * mean entropy")
    critic_lr: float = opt(5e-6, "critic learning rate (only with the gae estimator)")
    value_clip_eps: float = opt(0.2, "critic value clip epsilon")
    seed: int = opt(0, "seed for the critic's fresh value head (identical on every rank)")
    cpus_per_rank: float = opt(1, "CPUs reserved per rank")
    gpus_per_rank: float = opt(0, "GPUs per rank (0 with --model.device cuda = 1)")
    resources: dict[str, float] = opt(help="custom Ray resources each rank needs, e.g. '{gpu8_node: 1}' to pin the "
                                           "ranks to a node type that advertises it", factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field; called at construction and again before any actor starts."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage must be in 0..3, got {self.zero_stage}. Fix: --learner.zero_stage 2")
        if self.ranks < 1:
            raise ValueError(f"learner.ranks must be >= 1, got {self.ranks}.")
        if self.micro_batch_size < 1:
            raise ValueError(f"learner.micro_batch_size must be >= 1, got {self.micro_batch_size}.")
        if self.ppo_epochs < 1:
            raise ValueError(f"learner.ppo_epochs must be >= 1, got {self.ppo_epochs}.")
        if not self.cpus_per_rank > 0:
            raise ValueError(f"learner.cpus_per_rank must be > 0, got {self.cpus_per_rank}.")


def lr_lambda(cfg: LearnerConfig):
    """Multiplier of the base learning rate at optimizer step k (0-based), for torch's LambdaLR."""
    if cfg.lr_schedule == "cosine" and cfg.total_steps <= cfg.warmup_steps:
        raise ValueError(f"learner.lr_schedule cosine needs learner.total_steps > learner.warmup_steps "
                         f"(got {cfg.total_steps} <= {cfg.warmup_steps}); the RL job sets it to iterations x ppo_epochs.")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps  # linear warm-up: the first step already moves
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
        # cosine decay: lr_k = lr * 0.5 * (1 + cos(pi * progress))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------------------ batch layout


def _padded_batch(prompt_ids: list, response_ids: list, device) -> tuple[torch.Tensor, ...]:
    """(input_ids [B, L], attention_mask [B, L], targets [B, T], mask [B, T], positions [B, T]).

    positions[i, j] = P_i + j - 1: the column whose output predicts (or values the state before)
    response token j of row i; clamped into range on padding.
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every row needs at least one prompt token: the first response token is predicted from it")
    sequences = [np.concatenate([np.asarray(p), np.asarray(r)]) for p, r in zip(prompt_ids, response_ids)]
    input_ids, attention_mask = ragged_to_padded(sequences, 0, torch.long)
    targets, mask = ragged_to_padded(response_ids, 0, torch.long)
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids])
    positions = prompt_lengths[:, None] - 1 + torch.arange(targets.shape[1])[None, :]
    positions = positions.clamp(max=input_ids.shape[1] - 1)
    return (input_ids.to(device), attention_mask.long().to(device), targets.to(device), mask.to(device),
            positions.to(device))


def policy_forward(model, prompt_ids: list, response_ids: list, temperature: float = 1.0,
                   entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B, T], entropy [B, T], mask [B, T]) of the response tokens under softmax(logits / temperature).

    prompt_ids, response_ids: one 1-D int array per row (ragged). Padding holds 0 in logprobs and entropy.
    entropy_grad=False computes the entropy without a graph (saves a [B, T, V] float32 buffer when the
    entropy is only reported).
    """
    input_ids, attention_mask, targets, mask, positions = _padded_batch(prompt_ids, response_ids, model.device)
    first = min(len(p) for p in prompt_ids) - 1  # the first column any row needs
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=input_ids.shape[1] - first,
                use_cache=False)
    kept = out.logits  # [B, L - first, V]: columns first .. L-1
    index = (positions - first)[..., None].expand(-1, -1, kept.shape[-1])
    logits = kept.gather(1, index).float() / temperature  # [B, T, V], row i's own columns
    logprobs = token_logprobs(logits, targets) * mask
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits) * mask
    return logprobs, entropy, mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, cfg: LearnerConfig,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(scalar loss to minimise, metrics) = PPO-clip + [kl_coef * k3 if k3_loss] - entropy_coef * entropy."""
    pg_loss, clip_fraction = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_eps)
    k1 = masked_mean(kl_k1(logprobs, ref_logprobs), mask)
    k3 = masked_mean(kl_k3(logprobs, ref_logprobs), mask)
    mean_entropy = masked_mean(entropy, mask) if entropy is not None else torch.zeros(())
    loss = pg_loss
    if cfg.kl_mode == "k3_loss":
        # KL penalty in the loss: L += beta * mean_t k3_t
        loss = loss + cfg.kl_coef * k3
    if cfg.entropy_coef:
        # entropy bonus: L -= c_H * mean_t H_t
        loss = loss - cfg.entropy_coef * mean_entropy
    # probability ratio, reported: rho_t = exp(log pi - log pi_old)
    ratio = masked_mean(torch.exp(logprobs - old_logprobs), mask)
    metrics = {"loss": loss, "pg_loss": pg_loss, "kl_k1": k1, "kl_k3": k3, "entropy": mean_entropy,
               "clip_fraction": clip_fraction, "ratio": ratio}
    return loss, {name: float(value.detach()) for name, value in metrics.items()}


# ------------------------------------------------------------------------------------------------ critic


def load_critic(path: str, device: str = "cpu", seed: int = 0):
    """The policy's backbone with a fresh scalar head: AutoModelForTokenClassification(num_labels=1), float32."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # values must be a deterministic function of the state
    torch.manual_seed(seed)  # the head is freshly initialised: the same on every rank
    model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=torch.float32,
                                                            attn_implementation="sdpa")
    return model.to(device).eval()


def critic_forward(critic_model, prompt_ids: list, response_ids: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, T], mask [B, T]): V(s_j) for each response token j, float32, 0 on padding."""
    input_ids, attention_mask, _, mask, positions = _padded_batch(prompt_ids, response_ids, critic_model.device)
    out = critic_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    all_values = out.logits.squeeze(-1).float()  # [B, L]: one scalar per position
    return all_values.gather(1, positions) * mask, mask


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                cfg: LearnerConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """(clipped value loss, metrics): value_loss with cfg.value_clip_eps, plus the mean value and error."""
    loss = value_loss(values, old_values, returns, mask, cfg.value_clip_eps)
    metrics = {"loss": loss, "value_loss": loss, "values": masked_mean(values, mask),
               "value_error": masked_mean((values - returns).abs(), mask)}
    return loss, {name: float(value.detach()) for name, value in metrics.items()}
