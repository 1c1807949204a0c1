"""The frozen base model as a Ray actor: endogenous rewards and reference log-probs from one forward pass.

`EndogenousScorer` is a plain class: Ray Data uses it as an actor-pool UDF for offline scoring, and
`BaseModelActor` (the same class under ray.remote) serves the RL driver. Both take and return Arrow.
"""
from __future__ import annotations

import dataclasses
import math

import pyarrow as pa
import ray

from actors.placement import PlacementConfig, bundle, gpus_for, node_resources, wait_for_room
from pipeline.arrow import CONTEXT_COLUMN, SCORED_FIELDS, arrow_to_contexts, numpy_to_ragged, ragged_to_numpy
from pipeline.config import opt
from pipeline.endogenous import EndoRewardConfig, score_endogenous
from pipeline.judge import answer_token_ids, judge_margins
from pipeline.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_model
from pipeline.precision import precision_record


@dataclasses.dataclass
class ScoringConfig:
    replicas: int = opt(1, "base-model replicas scoring in parallel (Ray Data actor pool)")
    cpus_per_replica: float = opt(0, "CPUs per replica (0 = the largest node's CPUs / replicas: in local mode, "
                                     "the machine shared by the replicas)")
    gpus_per_replica: float = opt(0, "GPUs per replica (0 with --model.device cuda = 1)")
    resources: dict[str, float] = opt(help="custom Ray resources each replica needs (pins it to a node type)",
                                      factory=dict)
    batch_size: int = opt(64, "rows per Arrow batch sent to a replica")


class EndogenousScorer:
    def __init__(self, model_cfg: ModelConfig, reward_cfg: EndoRewardConfig):
        path = resolve_model(model_cfg.name, model_cfg.cache_dir)
        self.precision_record = precision_record(model_cfg.dtype, model_cfg.device)  # dtype auto: on this node
        # printed here: a Ray Data or Serve replica has no other way to tell the job (Ray prefixes the actor)
        print(f"scorer {self.precision_record['line']}", flush=True)
        self.model = load_causal_lm(path, self.precision_record["dtype"], model_cfg.device)
        self.tokenizer = load_tokenizer(path)
        self.reward_cfg = reward_cfg

    def precision(self) -> dict[str, str]:
        """The dtype this scorer resolved and runs in (pipeline/precision.py: precision_record)."""
        return self.precision_record

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch)

    def score(self, batch: pa.Table, reward_cfg: EndoRewardConfig | None = None) -> pa.Table:
        """SCORE_REQUEST rows (+ any other columns) -> the same rows with SCORED_FIELDS appended. `reward_cfg`
        (default: the one this scorer was built with) lets the reward server score each request's options. Forms
        pmi and contrastive read each row's extra contexts from CONTEXT_COLUMN."""
        contexts = arrow_to_contexts(batch[CONTEXT_COLUMN]) if CONTEXT_COLUMN in batch.column_names else None
        scores = score_endogenous(self.model, ragged_to_numpy(batch["prompt_ids"]), ragged_to_numpy(batch["response_ids"]),
                                  batch["finished"].to_pylist(), reward_cfg or self.reward_cfg, contexts)
        columns = [numpy_to_ragged(scores.token_rewards, pa.float32()), numpy_to_ragged(scores.ref_logprobs, pa.float32()),
                   pa.array(scores.rewards, pa.float32())]
        for (name, type_), column in zip(SCORED_FIELDS, columns):
            batch = batch.append_column(pa.field(name, type_), column)
        return batch


class JudgeScorer(EndogenousScorer):
    """LLM-as-a-judge with the same model: rows with `prompt_ids` (judge prompts) -> `judge_margin`."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        a_id, b_id = answer_token_ids(self.tokenizer)
        margins = judge_margins(self.model, ragged_to_numpy(batch["prompt_ids"]), a_id, b_id, self.reward_cfg.pack_tokens)
        return batch.append_column("judge_margin", pa.array(margins, pa.float32()))


BaseModelActor = ray.remote(EndogenousScorer)


def replica_cpus(scoring: ScoringConfig, nodes: list[dict[str, float]]) -> float:
    """CPUs of one scoring replica: the configured number, else a share of the largest node. One replica must fit
    one node: a share of the cluster's total fits none when no node is that big."""
    largest = max((node.get("CPU", 0.0) for node in nodes), default=1.0)
    return scoring.cpus_per_replica or max(1.0, largest // scoring.replicas)


def map_with_actor_pool(table: pa.Table, scorer_cls: type, model_cfg: ModelConfig, reward_cfg: EndoRewardConfig,
                        scoring: ScoringConfig):
    """Stream `table` through an actor pool of `scorer_cls` with Ray Data; yields result batches in input order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the job shows one tqdm bar over rows instead
    num_blocks = max(1, math.ceil(table.num_rows / scoring.batch_size))
    cpus = replica_cpus(scoring, node_resources())
    gpus = gpus_for(model_cfg.device, scoring.gpus_per_replica)
    dataset = ray.data.from_arrow(table, override_num_blocks=num_blocks).map_batches(
        scorer_cls, fn_constructor_kwargs={"model_cfg": model_cfg, "reward_cfg": reward_cfg},
        batch_size=scoring.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=scoring.replicas),
        num_cpus=cpus, num_gpus=gpus or None, resources=scoring.resources or None, udf_modifying_row_count=False)
    return dataset.iter_batches(batch_format="pyarrow", batch_size=None)


def wait_for_replica_room(model_cfg: ModelConfig, scoring: ScoringConfig, placement: PlacementConfig) -> None:
    """Ray Data waits for room for its actor pool without end: check first that one replica can be placed (an
    autoscaler adds a node for it), and stop with the request named after placement.timeout_s."""
    request = bundle(scoring.cpus_per_replica or 1, gpus_for(model_cfg.device, scoring.gpus_per_replica), scoring.resources)
    try:
        wait_for_room("scoring replicas", request, placement)
    except RuntimeError as e:
        raise SystemExit(f"could not place a scoring replica: {e}") from None
