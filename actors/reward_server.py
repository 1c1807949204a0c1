"""The reward server: a Ray Serve deployment hosting the frozen base model (and optionally a sentence RM).

Routes (FastAPI ingress; bodies and answers in pipeline/reward_api.py):
  POST /v1/reward    EndoRL's own protocol
  POST /get_reward   OpenRLHF's remote reward protocol
  GET  /health       liveness and the limits a client must respect (Serve's proxy also answers /-/healthz)

Requests are parsed, checked and tokenized as they arrive; each one then waits in a `@serve.batch` queue bounded
by tokens (batch_size_fn), so a burst of small requests is scored as one batch by the same prompt-shared packed
scorer that `jobs.score` uses. Scoring runs in a worker thread, so the replica keeps accepting requests (and
enforcing their timeouts) while a batch computes. A bad request gets its own error and never reaches a batch.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter

from actors.base_model import EndogenousScorer
from actors.placement import gpus_for
from pipeline.arrow import context_columns, request_table
from pipeline.config import opt
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import ModelConfig, context_window
from pipeline.reward_api import (LimitsConfig, RequestError, Scored, ScoreJob, check_authorization,
                                 check_declared_length, encode_openrlhf_request, encode_reward_request,
                                 openrlhf_answer, parse_json_body, reward_answer)


@dataclasses.dataclass
class BatchingConfig:
    max_batch_tokens: int = opt(16384, "most prompt + response tokens in one scoring batch (requests are batched "
                                       "whole, so at least limits.max_request_tokens)")
    batch_wait_timeout_s: float = opt(0.1, "how long a batch waits for more requests after its first one (0.01 "
                                           "split a burst of 32 one-row requests into batches of 1 to 10 here)")
    max_ongoing_requests: int = opt(128, "requests one replica holds at once (parsing, queued or scoring)")
    max_queued_requests: int = opt(1024, "requests Serve queues for the replicas beyond those; more get 503")


@dataclasses.dataclass
class ReplicaConfig:
    replicas: int = opt(1, "replicas of the server (fixed count, unless autoscaling is on)")
    min_replicas: int = opt(1, "autoscaling: fewest replicas (used when max_replicas > 0)")
    max_replicas: int = opt(0, "autoscaling: most replicas; 0 = no autoscaling, `replicas` fixed")
    target_ongoing_requests: float = opt(64, "autoscaling: ongoing requests per replica Serve aims at")
    cpus_per_replica: float = opt(0, "CPUs per replica (its torch threads); 0 = the largest node's CPUs / replicas")
    gpus_per_replica: float = opt(0, "GPUs per replica (0 with --model.device cuda = 1)")
    resources: dict[str, float] = opt(help="custom Ray resources each replica needs (pins it to a node type)",
                                      factory=dict)


class _BatchSizeWarning(logging.Filter):
    """Serve warns when max_batch_size exceeds max_ongoing_requests, counting requests; our batch size counts
    tokens, so the warning is always wrong here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_ongoing_requests" not in record.getMessage()


def batch_tokens(jobs: list[ScoreJob]) -> int:
    return sum(job.tokens for job in jobs)


def encode_openrlhf_sentence_request(data, tokenizer, window, reward_cfg, limits) -> ScoreJob:
    job = encode_openrlhf_request(data, tokenizer, window, reward_cfg, limits)
    job.sentence_rm = True
    return job


def rows_table(jobs: list[ScoreJob], rows: list[tuple[int, int]], contexts: bool = False) -> pa.Table:
    """The rows' score requests; with `contexts`, their extra contexts for reward forms pmi and contrastive."""
    extra = context_columns([jobs[j].context_prompt_ids[i] for j, i in rows]) if contexts else {}
    return request_table([jobs[j].prompt_ids[i] for j, i in rows], [jobs[j].response_ids[i] for j, i in rows],
                         [jobs[j].finished[i] for j, i in rows], **extra)


# Everything the deployment uses is defined above it: Serve serializes the class when it is decorated.
app = FastAPI(title="EndoRL reward server", docs_url=None, redoc_url=None)


@serve.deployment(name="RewardServer")
@serve.ingress(app)
class RewardServer:
    def __init__(self, model_cfg: ModelConfig, reward_cfg: EndoRewardConfig, limits: LimitsConfig,
                 batching: BatchingConfig, sentence_rm: str = "", openrlhf_reward: str = "endogenous",
                 auth_digest: str = ""):
        logging.getLogger("ray.serve").addFilter(_BatchSizeWarning())
        self.scorer = EndogenousScorer(model_cfg, reward_cfg)
        self.tokenizer, self.reward_cfg, self.limits = self.scorer.tokenizer, reward_cfg, limits
        self.window = context_window(self.scorer.model.config, model_cfg.max_length)
        self.sentence = None
        if sentence_rm:
            from actors.sentence_rm import SentenceRMScorer
            self.sentence = SentenceRMScorer(sentence_rm, model_cfg.device)
        self.openrlhf_reward, self.auth_digest = openrlhf_reward, auth_digest
        # one thread for all scoring: the same OS thread each batch keeps torch's OpenMP team and caches warm
        self.scoring_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.score_batch.set_max_batch_size(batching.max_batch_tokens)
        self.score_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.requests = Counter("endorl_reward_requests", "reward requests answered, by route and HTTP status",
                                tag_keys=("route", "status"))
        self.scored_tokens = Counter("endorl_reward_scored_tokens", "prompt + response tokens scored")

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "window": self.window, "sentence_rm": self.sentence is not None,
                "auth": bool(self.auth_digest), "limits": dataclasses.asdict(self.limits)}

    @app.post("/v1/reward")
    async def reward(self, request: Request) -> JSONResponse:
        return await self.answer(request, "/v1/reward", partial(encode_reward_request, has_sentence_rm=self.sentence is not None),
                                 reward_answer)

    @app.post("/get_reward")
    async def get_reward(self, request: Request) -> JSONResponse:
        if self.openrlhf_reward == "sentence_rm":
            return await self.answer(request, "/get_reward", encode_openrlhf_sentence_request,
                                     partial(openrlhf_answer, use_sentence_rm=True))
        return await self.answer(request, "/get_reward", encode_openrlhf_request, openrlhf_answer)

    async def answer(self, request: Request, route: str, encode, make_answer) -> JSONResponse:
        """Auth, body, parse + tokenize, wait for the batch (bounded by the timeout): every error is this request's."""
        try:
            check_authorization(request.headers.get("authorization"), self.auth_digest)
            check_declared_length(request.headers.get("content-length"), self.limits)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limits.max_body_bytes:
                    break  # parse_json_body answers 413 without reading the rest
            job = encode(parse_json_body(bytes(body), self.limits), self.tokenizer, self.window, self.reward_cfg,
                         self.limits)
            try:
                scored = await asyncio.wait_for(self.score_batch(job), self.limits.request_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(503, "request", f"not scored within limits.request_timeout_s="
                                                   f"{self.limits.request_timeout_s:g} s: the server is busy. "
                                                   f"Fix: retry later, or send smaller requests.") from None
            self.scored_tokens.inc(job.tokens)
            status, content = 200, make_answer(job, scored)
        except RequestError as e:
            status, content = e.status, e.body()
        except Exception as e:  # a failure of the scorer itself: the requests of that batch get 500, the server stays up
            logging.getLogger(__name__).exception("scoring failed")
            status, content = 500, RequestError(500, "server", f"scoring failed: {type(e).__name__}: {e}").body()
        self.requests.inc(tags={"route": route, "status": str(status)})
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(content, status_code=status, headers=headers)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.1, batch_size_fn=batch_tokens)  # both set from config
    async def score_batch(self, jobs: list[ScoreJob]) -> list[Scored]:
        return await asyncio.get_running_loop().run_in_executor(self.scoring_thread, self.score_jobs, jobs)

    def score_jobs(self, jobs: list[ScoreJob]) -> list[Scored]:
        """Every row of every job, scored in one packed call per distinct reward config (the requests' options)."""
        results = [Scored([0.0] * len(job.prompt_ids), [[] for _ in job.prompt_ids]) for job in jobs]
        by_config: dict[str, list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            key = json.dumps(dataclasses.asdict(job.reward), sort_keys=True)  # any field type, hashable
            by_config.setdefault(key, []).extend((j, i) for i in range(len(job.prompt_ids)))
        for rows in by_config.values():
            scored = self.scorer.score(rows_table(jobs, rows, contexts=True), jobs[rows[0][0]].reward)
            for (j, i), reward, token_rewards in zip(rows, scored["reward"].to_pylist(), scored["token_rewards"].to_pylist()):
                results[j].rewards[i], results[j].token_rewards[i] = reward, token_rewards
        rows = [(j, i) for j, job in enumerate(jobs) if job.sentence_rm for i in range(len(job.prompt_ids))]
        if rows:
            scored = self.sentence.score(rows_table(jobs, rows))
            for j in {j for j, _ in rows}:
                results[j].sentence_rewards = [0.0] * len(jobs[j].prompt_ids)
                results[j].sentence_token_rewards = [[] for _ in jobs[j].prompt_ids]
            for (j, i), reward, dense in zip(rows, scored["sentence_reward"].to_pylist(),
                                             scored["sentence_rewards"].to_pylist()):
                results[j].sentence_rewards[i], results[j].sentence_token_rewards[i] = reward, dense
        return results


def reward_app(model_cfg: ModelConfig, reward_cfg: EndoRewardConfig, limits: LimitsConfig, batching: BatchingConfig,
               replicas: ReplicaConfig, replica_cpus: float, env_vars: dict, sentence_rm: str = "",
               openrlhf_reward: str = "endogenous", auth_digest: str = ""):
    """The Serve application: replica resources, count or autoscaling, and the queue limits, all from config."""
    actor_options = {"num_cpus": replica_cpus, "num_gpus": gpus_for(model_cfg.device, replicas.gpus_per_replica),
                     "runtime_env": {"env_vars": env_vars}}
    if replicas.resources:
        actor_options["resources"] = replicas.resources
    scaling = ({"autoscaling_config": {"min_replicas": replicas.min_replicas, "max_replicas": replicas.max_replicas,
                                       "target_ongoing_requests": replicas.target_ongoing_requests}}
               if replicas.max_replicas else {"num_replicas": replicas.replicas})
    deployment = RewardServer.options(ray_actor_options=actor_options, max_ongoing_requests=batching.max_ongoing_requests,
                                      max_queued_requests=batching.max_queued_requests, **scaling)
    return deployment.bind(model_cfg, reward_cfg, limits, batching, sentence_rm, openrlhf_reward, auth_digest)
