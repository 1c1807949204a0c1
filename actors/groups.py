"""The cluster side of the RL loop: every worker group, behind the small interface `pipeline.driver` uses.

Batches stay in Ray's object store: methods take and return ObjectRefs of Arrow tables, and only metric dicts
come back to the driver. Each method returns when its phase is done, so the driver can time phases.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import ray

from actors.base_model import BaseModelActor
from actors.learner import LearnerGroup
from actors.rollout import start_rollout_engines
from actors.sentence_rm import SentenceRMActor
from pipeline.arrow import ragged_to_numpy
from pipeline.experience import build_experience
from pipeline.rollout import logprob_parity


@ray.remote(num_cpus=0)
def concat_task(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables)


@ray.remote(num_cpus=0, num_returns=2)
def experience_task(scored: pa.Table, values: list | None, cfg, group_size: int, kl_coef: float, kl_in_reward: bool):
    return build_experience(scored, cfg, group_size, kl_coef, kl_in_reward, values)


def wait(refs: list) -> list:
    """Block until every ref is computed, without copying the results to the driver."""
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return refs


class RLWorkers:
    """vLLM engines, frozen base-model scorers, policy learners and (for GAE) critic learners."""

    def __init__(self, cfg, model_path: str):
        self.cfg = cfg
        self.engines = start_rollout_engines(model_path, cfg.rollout_dtype, cfg.model.device, cfg.rollout, cfg.ray)
        self.scorers = [BaseModelActor.options(num_cpus=cfg.scorer_cpus, num_gpus=cfg.scorer_gpus).remote(cfg.model, cfg.reward)
                        for _ in range(cfg.scorers)]
        self.sentence_rm = (SentenceRMActor.options(num_cpus=cfg.sentence_rm_cpus, num_gpus=cfg.sentence_rm_gpus)
                            .remote(cfg.sentence_rm, cfg.model.device) if cfg.advantage.sentence_rm_weight else None)
        self.learner = LearnerGroup(model_path, cfg.model, cfg.learner, role="policy")
        self.critic = LearnerGroup(model_path, cfg.model, cfg.learner, role="critic") if cfg.advantage.estimator == "gae" else None
        wait([actor.__ray_ready__.remote() for actor in self.scorers + self.engines + ([self.sentence_rm] if self.sentence_rm else [])])
        self.last_batch = None

    def generate(self, prompts: pa.Table, seed: int, n_samples: int) -> list:
        """Prompts split across engines in contiguous shards (a prompt's samples stay together)."""
        shards = np.array_split(np.arange(prompts.num_rows), len(self.engines))
        refs = [engine.generate.remote(prompts.take(idx), n_samples=n_samples, seed=seed + 7919 * i)
                for i, (engine, idx) in enumerate(zip(self.engines, shards)) if len(idx)]
        return wait(refs)

    def score(self, rollout_refs: list) -> ray.ObjectRef:
        """Endogenous rewards + reference log-probs (one forward pass) per shard, then the sentence RM's dense
        rewards when it is a reward source; one table ref back."""
        scored = [self.scorers[i % len(self.scorers)].score.remote(ref) for i, ref in enumerate(rollout_refs)]
        if self.sentence_rm:
            scored = [self.sentence_rm.score.remote(ref) for ref in scored]
        return wait([concat_task.remote(*scored)])[0]

    def values(self, scored_ref) -> list | None:
        return self.critic.values(scored_ref) if self.critic else None

    def make_experience(self, scored_ref, values) -> tuple[ray.ObjectRef, dict]:
        kl_in_reward = self.cfg.learner.kl_mode == "k1_reward"
        experience, metrics = experience_task.remote(scored_ref, values, self.cfg.advantage, self.cfg.rollout.n_samples,
                                                     self.cfg.learner.kl_coef, kl_in_reward)
        self.last_batch = experience
        return experience, ray.get(metrics)

    def train(self, experience_ref) -> dict:
        metrics = {f"policy/{k}": v for k, v in self.learner.train_step(experience_ref, self.cfg.rollout.temperature).items()}
        if self.critic:
            metrics.update({f"critic/{k}": v for k, v in self.critic.train_step(experience_ref).items()})
        return metrics

    def sync_weights(self) -> float:
        """Learner rank 0's full state dict -> every engine, through the object store (no files)."""
        state_ref = self.learner.state_dict_ref(self.cfg.rollout_dtype)  # in the engine's dtype: half the bytes in bf16
        return max(ray.get([engine.load_weights.remote(state_ref) for engine in self.engines]))

    def check_sync(self, rows: int = 2) -> float:
        """Max |log-prob difference| between engine 0 and the learners on the last batch's first rows."""
        probe = ray.get(self.last_batch).slice(0, rows).select(["prompt_ids", "response_ids"])
        prompts = [p.tolist() for p in ragged_to_numpy(probe["prompt_ids"])]
        responses = [r.tolist() for r in ragged_to_numpy(probe["response_ids"])]
        engine_logp = ray.get(self.engines[0].token_logprobs.remote(prompts, responses))
        return logprob_parity(engine_logp, self.learner.logprobs(probe, temperature=1.0))

    def heldout_reward(self, prompts: pa.Table, seed: int) -> dict:
        """Samples of the held-out prompts from the current policy, scored like training rollouts. The seed is
        the same at every evaluation, so successive evaluations differ by the policy, not by the noise."""
        scored = ray.get(self.score(self.generate(prompts, seed=seed, n_samples=self.cfg.heldout_samples)))
        lengths = [len(r) for r in ragged_to_numpy(scored["response_ids"])]
        metrics = {"heldout/reward": float(np.mean(scored["reward"].to_numpy())),
                   "heldout/response_length": float(np.mean(lengths))}
        if "sentence_reward" in scored.column_names:
            metrics["heldout/sentence_rm"] = float(np.mean(scored["sentence_reward"].to_numpy()))
        return metrics

    def save(self, path: str, state: dict) -> None:
        self.learner.save_checkpoint(os.path.join(path, "policy"), state)
        if self.critic:
            self.critic.save_checkpoint(os.path.join(path, "critic"), state)
        with open(os.path.join(path, "driver_state.json"), "w") as fh:  # last: marks the checkpoint complete
            json.dump(state, fh)

    def load(self, path: str) -> dict:
        self.learner.load_checkpoint(os.path.join(path, "policy"))
        if self.critic:
            self.critic.load_checkpoint(os.path.join(path, "critic"))
        with open(os.path.join(path, "driver_state.json")) as fh:
            return json.load(fh)

    def shutdown(self) -> None:
        self.learner.shutdown()
        if self.critic:
            self.critic.shutdown()
        for actor in self.engines + self.scorers + ([self.sentence_rm] if self.sentence_rm else []):
            ray.kill(actor)
