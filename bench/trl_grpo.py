"""TRL's side of bench/vs_trl.py: GRPOTrainer on one CPU process, timed per step and per phase. Run by vs_trl.py
in TRL's own environment (`make .venv-trl/.installed`); it imports nothing from EndoRL.

    .venv-trl/bin/python bench/trl_grpo.py --model DIR --prompts prompts.json --out trl.json [--bf16]

Reward: the frozen model's log-likelihood of the completion, sum over tokens of log p_ref(y_t | x, y_<t), one
padded forward of a frozen copy (the closest TRL reward to EndoRL's endogenous reward, which costs one forward too).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class Timed(GRPOTrainer):
    """GRPOTrainer that adds up the seconds of generation, reward and the whole generate-and-score phase per step."""

    phase_seconds: dict

    def _timed(self, phase: str, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.phase_seconds[phase] += time.perf_counter() - start

    def _generate(self, *args, **kwargs):
        return self._timed("rollout", super()._generate, *args, **kwargs)

    def _calculate_rewards(self, *args, **kwargs):
        return self._timed("reward", super()._calculate_rewards, *args, **kwargs)

    def _generate_and_score_completions(self, *args, **kwargs):
        return self._timed("generate_and_score", super()._generate_and_score_completions, *args, **kwargs)


class StepTimer(TrainerCallback):
    def __init__(self, trainer_ref: list):
        self.trainer_ref, self.steps = trainer_ref, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.trainer_ref[0].phase_seconds = {"rollout": 0.0, "reward": 0.0, "generate_and_score": 0.0}

    def on_step_end(self, args, state, control, **kwargs):
        p = self.trainer_ref[0].phase_seconds
        step = time.perf_counter() - self.start
        # score (+ref) = everything of generate-and-score that is not generation: reward, ref and old log-probs
        self.steps.append({"step": step, "rollout": p["rollout"], "score": p["generate_and_score"] - p["rollout"],
                           "reward": p["reward"], "train": step - p["generate_and_score"]})


def loglik_reward(model_dir: str, dtype: torch.dtype):
    frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def reward(prompts, completions, completion_ids, **kwargs):
        prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                      for p in prompts]
        rows = [p + list(c) for p, c in zip(prompt_ids, completion_ids)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id or 0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.inference_mode():
            logp = torch.log_softmax(frozen(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        # R = sum_t log p_ref(y_t | x, y_<t), over the completion's positions only
        return [token_logp[i, len(p) - 1:len(r) - 1].sum().item() for i, (p, r) in enumerate(zip(prompt_ids, rows))]

    return reward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of chat message lists")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts_per_step", type=int, default=8)
    ap.add_argument("--n_samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--bf16", action="store_true", help="autocast bf16 with fp32 weights (EndoRL's learner policy)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = json.load(open(args.prompts))
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    batch = args.prompts_per_step * args.n_samples
    config = GRPOConfig(output_dir="/tmp/trl_grpo_bench", use_cpu=True, bf16=args.bf16, max_steps=args.steps,
                        per_device_train_batch_size=batch, num_generations=args.n_samples,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=args.beta,
                        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                        dataloader_num_workers=0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    trainer_ref: list = []
    timer = StepTimer(trainer_ref)
    trainer = Timed(model=args.model, reward_funcs=loglik_reward(args.model, dtype), args=config,
                    train_dataset=dataset, callbacks=[timer])
    trainer_ref.append(trainer)
    trainer.train()
    json.dump({"completions_per_step": batch, "steps": timer.steps, "bf16": args.bf16}, open(args.out, "w"))


if __name__ == "__main__":
    main()
