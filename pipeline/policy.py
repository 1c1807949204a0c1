"""What the learners compute: policy log-probs, PPO + KL + entropy loss, critic values and value loss.

Pure torch: no Ray, no DeepSpeed. `model` is anything called like a Hugging Face model (the HF model itself
or the DeepSpeed engine wrapping it; the engine must be called, not bypassed, so its gradient hooks run).

Batch layout: packed, no padding (`pack_rows`). A micro-batch is one sequence: each distinct prompt once, then
the responses that share it, with position ids that restart at every prompt and a tree mask so that a response
sees only its prompt and itself (the scorer's layout, pipeline/endogenous.py). Logits at position t predict
token t+1, so response token j is predicted at the prompt's last token (j = 0) or at response token j - 1; the
LM head runs only at those positions (`logits_to_keep` as an index tensor), and the log-softmax and entropy
run in float32 over chunks of them. Results come back as a [B, T] response grid (T = longest response) with a
mask, the layout of the losses.

Precision: the models hold float32 weights; a bf16 learner calls these functions inside
`pipeline.precision.autocast("bfloat16", device)`, so matmuls run in bf16 while the gradients and the
optimizer's update land on the float32 weights (an lr-sized step that bf16 weights would round away).

Critic: AutoModelForTokenClassification(num_labels=1) loaded from the policy's folder: the same backbone
plus a fresh linear head (classifier dropout off). Its output at the position that predicts response token j
is V(s_j), the value of the state just before token j.

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
from pipeline.config import opt
from pipeline.endogenous import group_by_prompt, prompt_shared_inputs
from pipeline.losses import chunked_logprobs_entropy, kl_k1, kl_k3, ppo_clip_loss, value_loss
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
    micro_batch_size: int = opt(4, "most rows per forward pass; gradient accumulation = the micro-batches of a rank")
    micro_batch_tokens: int = opt(1024, "most packed tokens per forward pass (rows sharing a prompt share its tokens; "
                                        "a longer row goes alone; on CPU the tree mask's attention grows with the "
                                        "square of a pack); 0 = no limit")
    logit_chunk: int = opt(512, "response tokens per chunk of the log-softmax and entropy (bounds their float32 memory)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~1/3 more compute)")
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
        if self.micro_batch_tokens < 0 or self.logit_chunk < 1:
            raise ValueError(f"learner.micro_batch_tokens must be >= 0 and learner.logit_chunk >= 1, got "
                             f"{self.micro_batch_tokens} and {self.logit_chunk}.")
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


@dataclasses.dataclass
class PackedRows:
    """A micro-batch packed for one forward pass (pipeline/endogenous.py: prompt_shared_inputs): rows that share a
    prompt share its tokens, no padding. Response token j of row i is targets[k] with rows[k] = i, cols[k] = j; it
    is predicted at position predict_at[k] of the packed sequence (the prompt's last token for j = 0, else
    response token j - 1), where the critic's output is V(s_j)."""
    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    attention_mask: torch.Tensor  # [1, 1, N, N] bool: the tree mask
    predict_at: torch.Tensor  # [R]
    targets: torch.Tensor  # [R]
    rows: torch.Tensor  # [R]
    cols: torch.Tensor  # [R]
    shape: tuple[int, int]  # (B, T) of the [B, T] response grid, T = longest response

    def grid(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-token values [R] -> the [B, T] response grid, 0 on padding (differentiable)."""
        return flat.new_zeros(self.shape).index_put((self.rows, self.cols), flat)

    def mask(self) -> torch.Tensor:
        return self.grid(torch.ones(len(self.rows), device=self.rows.device))


def pack_rows(prompt_ids: list, response_ids: list, device) -> PackedRows:
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every row needs at least one prompt token: the first response token is predicted from it")
    groups = group_by_prompt(prompt_ids)
    segments = [(np.asarray(prompt_ids[g[0]]), [np.asarray(response_ids[i]) for i in g]) for g in groups]
    input_ids, position_ids, attention_mask = prompt_shared_inputs(segments, device)
    predict_at, rows, cols, start = [], [], [], 0
    for group in groups:
        prompt_end = start + len(prompt_ids[group[0]])  # the first response token of the group
        start = prompt_end
        for i in group:
            h = len(response_ids[i])
            predict_at.append(np.concatenate([[prompt_end - 1], start + np.arange(h - 1)])[:h])
            rows.append(np.full(h, i))
            cols.append(np.arange(h))
            start += h
    tensor = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device)  # noqa: E731
    targets = tensor([np.asarray(response_ids[i]) for group in groups for i in group])
    shape = (len(prompt_ids), max((len(r) for r in response_ids), default=0))
    return PackedRows(input_ids, position_ids, attention_mask, tensor(predict_at), targets, tensor(rows), tensor(cols),
                      shape)


def micro_batches(prompt_ids: list, response_ids: list, max_rows: int, max_tokens: int) -> list[list[int]]:
    """Consecutive rows, in order, packed into micro-batches of at most max_rows rows and max_tokens packed tokens
    (a prompt counted once per micro-batch; 0 = no token limit); a row longer than max_tokens goes alone."""
    batches, current, seen, used = [], [], set(), 0
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        key = np.asarray(prompt, dtype=np.int64).tobytes()
        cost = len(response) + (0 if key in seen else len(prompt))
        if current and (len(current) == max_rows or (max_tokens and used + cost > max_tokens)):
            batches.append(current)
            current, seen, used = [], set(), 0
            cost = len(prompt) + len(response)
        current.append(i)
        seen.add(key)
        used += cost
    return batches + [current] if current else batches


def split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """`batches` split (the one with most rows first, in halves) until there are `count` of them: every rank of a
    DeepSpeed group must run the same number of micro-batches. Needs count <= total rows."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        i = max(range(len(batches)), key=lambda k: len(batches[k]))
        if len(batches[i]) < 2:
            raise ValueError(f"cannot split {sum(map(len, batches))} rows into {count} micro-batches")
        half = len(batches[i]) // 2
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def policy_forward(model, prompt_ids: list, response_ids: list, temperature: float = 1.0,
                   entropy_grad: bool = True, logit_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B, T], entropy [B, T], mask [B, T]) of the response tokens under softmax(logits / temperature).

    prompt_ids, response_ids: one 1-D int array per row (ragged). The rows go in one packed forward pass
    (pack_rows); the LM head runs only where a response token is predicted, and the log-softmax and entropy
    run `logit_chunk` tokens at a time (pipeline/losses.py: ChunkedLogProbsEntropy). Padding holds 0.
    entropy_grad=False detaches the entropy (it is only reported).
    """
    packed = pack_rows(prompt_ids, response_ids, model.device)
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.attention_mask,
                logits_to_keep=packed.predict_at, use_cache=False)
    logprobs, entropy = chunked_logprobs_entropy(out.logits[0], packed.targets, temperature, logit_chunk)
    if not entropy_grad:
        entropy = entropy.detach()
    return packed.grid(logprobs), packed.grid(entropy), packed.mask()


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
    """(values [B, T], mask [B, T]): V(s_j) for each response token j, float32, 0 on padding; one packed pass."""
    packed = pack_rows(prompt_ids, response_ids, critic_model.device)
    out = critic_model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                       attention_mask=packed.attention_mask, use_cache=False)
    values = out.logits[0, :, 0].float()  # [N]: one scalar per position
    return packed.grid(values[packed.predict_at]), packed.mask()


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                cfg: LearnerConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """(clipped value loss, metrics): value_loss with cfg.value_clip_eps, plus the mean value and error."""
    loss = value_loss(values, old_values, returns, mask, cfg.value_clip_eps)
    metrics = {"loss": loss, "value_loss": loss, "values": masked_mean(values, mask),
               "value_error": masked_mean((values - returns).abs(), mask)}
    return loss, {name: float(value.detach()) for name, value in metrics.items()}
