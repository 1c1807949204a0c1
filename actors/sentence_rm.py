"""The trained sentence-level reward model as a Ray actor: dense rewards for rollouts, Arrow in, Arrow out.

`SentenceRMScorer` is a plain class (tests and Ray Data can use it in-process); `SentenceRMActor` is the same
class under ray.remote. What the rewards mean (which policy token gets which sentence's reward, EOS,
unfinished responses) is decided in pipeline/sentence_rewards.py.
"""
from __future__ import annotations

import os
import socket

import pyarrow as pa
import ray

from pipeline.arrow import FLOATS, numpy_to_ragged, ragged_to_numpy
from pipeline.models import check_device
from pipeline.sentence_rewards import dense_sentence_rewards
from pipeline.sentence_rm import BOUNDARY_TOKEN, CONFIG_FILE, load_reward_model
from pipeline.storage import Storage

# What it appends to a rollout table.
SENTENCE_RM_FIELDS = [
    ("sentence_rewards", FLOATS),        # a_k r_k on the token ending sentence k, 0 elsewhere; one per response token
    ("sentence_reward", pa.float32()),   # response score R = the row's sum of sentence_rewards
]


class SentenceRMScorer:
    def __init__(self, rm_path: str, device: str = "cpu", splitter: str | None = None, batch_size: int = 16):
        """rm_path: a folder on this node (shared storage on a cluster) or an s3:// / gs:// URI, downloaded here.
        splitter: None = the one the RM was trained with (its reward_model.yaml)."""
        check_device(device)  # a cuda request without a GPU fails here, before loading anything
        storage = Storage(rm_path)
        if not storage.exists(CONFIG_FILE):
            raise FileNotFoundError(f"no trained reward model at {rm_path!r} as seen from node {socket.gethostname()} "
                                    f"(pid {os.getpid()}): it has no {CONFIG_FILE}. Fix: jobs.train_rm's STORAGE/final "
                                    f"folder, on storage every node mounts, or its s3:// / gs:// URI.")
        with storage.readable_dir("") as folder:
            self.model, self.tokenizer, config = load_reward_model(folder, device=device)
        if config.kind != "sentence":
            raise ValueError(f"{rm_path} holds a {config.kind!r} reward model; dense rewards need a sentence-level "
                             f"one (kind: sentence).")
        self.boundary_id = self.tokenizer.convert_tokens_to_ids(BOUNDARY_TOKEN)
        self.splitter = splitter or config.splitter
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch)

    def score(self, batch: pa.Table) -> pa.Table:
        """Rows with prompt_ids, response_ids, finished (+ any other columns) -> the same rows, SENTENCE_RM_FIELDS appended."""
        dense, scores = dense_sentence_rewards(self.model, self.tokenizer, self.boundary_id,
                                               ragged_to_numpy(batch["prompt_ids"]), ragged_to_numpy(batch["response_ids"]),
                                               self.splitter, batch["finished"].to_pylist(), self.batch_size)
        columns = [numpy_to_ragged(dense, pa.float32()), pa.array(scores, pa.float32())]
        for (name, type_), column in zip(SENTENCE_RM_FIELDS, columns):
            batch = batch.append_column(pa.field(name, type_), column)
        return batch


SentenceRMActor = ray.remote(SentenceRMScorer)
