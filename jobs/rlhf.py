"""RLHF with the endogenous reward of a frozen base model, on Ray.

    python -m jobs.rlhf --config configs/local.yaml              # local debug mode: embedded Ray, CPU
    ray job submit --working-dir . -- python -m jobs.rlhf --config configs/cluster.yaml

vLLM engines sample, the frozen base model scores (endogenous reward + reference log-probs in one pass),
DeepSpeed learners update the policy, and the new weights go back into the engines every step.
Writes TensorBoard logs, metrics.jsonl, checkpoints and curves.png under --output; --resume continues from
the newest checkpoint there.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from actors.cluster import RayConfig, init_ray
from pipeline.config import opt, parse_config, to_yaml
from pipeline.data import builtin_prompts, load_prompts, split_prompts
from pipeline.driver import rl_loop, tokenize_prompts
from pipeline.endogenous import EndoRewardConfig
from pipeline.experience import AdvantageConfig
from pipeline.models import ModelConfig, check_device, open_model
from pipeline.policy import LearnerConfig
from pipeline.rollout import RolloutConfig
from pipeline.runlog import RunLog, latest_checkpoint, plot_curves


@dataclasses.dataclass
class RLConfig:
    local: bool = opt(False, "local debug mode: an embedded single-node Ray, even if RAY_ADDRESS is set")
    prompts: str = opt("builtin", "'builtin', or a prompts/pairs file (.jsonl/.parquet/.json) or HF dataset name")
    heldout_fraction: float = opt(0.125, "share of prompts held out to measure the reward of the policy")
    heldout_samples: int = opt(4, "samples per held-out prompt at each evaluation (same seed every time)")
    steps: int = opt(20, "RL iterations")
    prompts_per_step: int = opt(8, "prompts per iteration (each sampled rollout.n_samples times)")
    seed: int = opt(0, "seed of the prompt order and the sampling")
    output: str = opt("runs/rlhf", "run folder: tensorboard/, metrics.jsonl, checkpoints/, curves.png, config.yaml")
    resume: bool = opt(False, "continue from the newest checkpoint in --output")
    checkpoint_every: int = opt(10, "save a checkpoint every K steps (and at the end); 0 = never")
    eval_every: int = opt(5, "held-out reward every K steps (and before the first step); 0 = never")
    sync_check_every: int = opt(5, "compare engine vs learner log-probs after the sync every K steps; 0 = never")
    sync_tolerance: float = opt(0.0, "max |log-prob diff| the sync check accepts; 0 = 1e-3 for a float32 engine, "
                                     "0.5 for bfloat16 (bf16 kernels alone differ by ~0.2: only gross failures show)")
    rollout_dtype: Literal["bfloat16", "float32"] = opt("bfloat16", "vLLM engine precision (fp16 does not run on CPU)")
    scorers: int = opt(1, "frozen base-model actors (endogenous reward + reference log-probs)")
    scorer_cpus: float = opt(1, "CPUs per base-model actor")
    scorer_gpus: float = opt(0, "GPUs per base-model actor")
    sentence_rm: str = opt("", "trained sentence RM folder (jobs.train_rm's output/final); used when "
                               "advantage.sentence_rm_weight != 0")
    sentence_rm_cpus: float = opt(1, "CPUs of the sentence-RM actor")
    sentence_rm_gpus: float = opt(0, "GPUs of the sentence-RM actor")
    model: ModelConfig = opt(factory=ModelConfig)
    reward: EndoRewardConfig = opt(factory=EndoRewardConfig)
    advantage: AdvantageConfig = opt(factory=AdvantageConfig)
    rollout: RolloutConfig = opt(factory=RolloutConfig)
    learner: LearnerConfig = opt(factory=LearnerConfig)
    ray: RayConfig = opt(factory=RayConfig)


def check_config(cfg: RLConfig, prompt_count: int, heldout_count: int) -> None:
    """Every refusal that can be known before a single actor starts."""
    try:
        check_device(cfg.model.device)
    except RuntimeError as e:
        raise SystemExit(f"--model.device: {e}")
    if prompt_count == 0:
        raise SystemExit(f"--prompts {cfg.prompts!r} gave zero prompts. Fix: point it at a file with a `prompt` column.")
    if cfg.advantage.estimator in ("grpo", "rloo") and cfg.rollout.n_samples < 2:
        raise SystemExit(f"--advantage.estimator {cfg.advantage.estimator} needs at least 2 samples per prompt, "
                         f"got --rollout.n_samples {cfg.rollout.n_samples}. Fix: --rollout.n_samples 4")
    if cfg.eval_every and heldout_count == 0:
        raise SystemExit("no held-out prompts to measure the reward on. Fix: --heldout_fraction 0.125, or --eval_every 0.")
    if cfg.prompts_per_step > prompt_count:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} is more than the {prompt_count} training prompts. "
                         f"Fix: lower it or give more prompts.")
    if cfg.advantage.sentence_rm_weight and not os.path.exists(os.path.join(cfg.sentence_rm, "reward_model.yaml")):
        raise SystemExit(f"--advantage.sentence_rm_weight {cfg.advantage.sentence_rm_weight} needs a trained sentence RM, "
                         f"but --sentence_rm {cfg.sentence_rm!r} holds no reward_model.yaml. Fix: train one with "
                         f"jobs.train_rm and pass its output/final folder.")


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(RLConfig, argv, __doc__)
    if cfg.local:
        cfg.ray.address = "local"
    print(to_yaml(cfg))
    try:
        prompts = builtin_prompts() if cfg.prompts == "builtin" else load_prompts(cfg.prompts)
        train_prompts, heldout_prompts = split_prompts(prompts, cfg.heldout_fraction, cfg.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--prompts: {e}")
    check_config(cfg, train_prompts.num_rows, heldout_prompts.num_rows)
    model_path, tokenizer, window = open_model(cfg.model)
    cfg.rollout.check_fits(window)
    try:
        train_ids = tokenize_prompts(train_prompts, tokenizer, cfg.reward.system_prompt, cfg.rollout.max_prompt_tokens)
        heldout_ids = tokenize_prompts(heldout_prompts, tokenizer, cfg.reward.system_prompt, cfg.rollout.max_prompt_tokens)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}")
    resume = latest_checkpoint(cfg.output) if cfg.resume else None
    if cfg.resume and resume is None:
        raise SystemExit(f"--resume: no complete checkpoint under {cfg.output}/checkpoints. Fix: drop --resume or fix --output.")
    cfg.learner.total_steps = cfg.learner.total_steps or cfg.steps * cfg.learner.ppo_epochs

    init_ray(cfg.ray, cfg.model.device)
    from actors.groups import RLWorkers  # imports vLLM/DeepSpeed wrappers only once the config is known good

    workers = RLWorkers(cfg, model_path)
    start_step = workers.load(resume[0])["step"] if resume else 0
    log = RunLog(cfg.output, to_yaml(cfg), resume_step=start_step)
    try:
        rl_loop(cfg, workers, train_ids, heldout_ids, log, start_step)
    finally:
        log.close()
        workers.shutdown()
    plot_curves(log.history(), os.path.join(cfg.output, "curves.png"))
    print(f"done: {cfg.output}/metrics.jsonl, {cfg.output}/curves.png, tensorboard --logdir {cfg.output}/tensorboard")
    return cfg.output


if __name__ == "__main__":
    main()
