"""The remote reward as a step of the RL loop's scoring: an actor next to the base-model scorer that replaces the
endogenous reward of a scored rollout with the reward servers' (pipeline/remote_reward.py). It holds no model,
only the tokenizer (to write the text the protocol carries), and waits on HTTP: it asks Ray for no CPU."""
from __future__ import annotations

import os

import pyarrow as pa
import ray

from pipeline.models import ModelConfig, load_tokenizer, resolve_model
from pipeline.remote_reward import RemoteRewardClient, RLRewardConfig, remote_rewarded
from pipeline.reward_api import AuthConfig, read_token


@ray.remote(num_cpus=0, max_concurrency=8)  # threaded: the shards of one step post concurrently
class RemoteRewardActor:
    def __init__(self, model_cfg: ModelConfig, reward_cfg: RLRewardConfig):
        # the token file (or variable) is read here, on this node: the token itself never passes through Ray
        token = read_token(AuthConfig(reward_cfg.remote_token_file, reward_cfg.remote_token_env), os.environ)
        self.client = RemoteRewardClient(reward_cfg, token)
        self.tokenizer = load_tokenizer(resolve_model(model_cfg.name, model_cfg.cache_dir))

    def score(self, table: pa.Table) -> pa.Table:
        return remote_rewarded(table, self.client, self.tokenizer)
