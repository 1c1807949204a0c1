"""DeepSpeed learners as Ray actors: one actor per data-parallel rank, and the driver-side group that runs them.

`PolicyLearner` is a plain class (one rank of a DeepSpeed group); the Ray actor is `PolicyLearnerActor =
ray.remote(PolicyLearner)`. The math is in pipeline/policy.py; this file only places it:

  - process group: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, then deepspeed.init_distributed with
    gloo on cpu and nccl on cuda (derived from --model.device). LOCAL_RANK is 0: Ray gives each actor its own
    CUDA_VISIBLE_DEVICES, so every rank sees its GPU as device 0.
  - engine: the HF model in float32 with float32 AdamW state (a torch.optim.AdamW object: a config optimizer
    would JIT-build FusedAdam), a LambdaLR warm-up/cosine schedule, ZeRO stage 0..3. DeepSpeed's bf16 mode is
    never on (it makes the params bf16); a bf16 compute dtype (LearnerConfig.dtype, auto resolved on this
    rank's node) runs the forward and loss under torch.autocast instead, backward outside it.
  - one train_step = ppo_epochs passes over this rank's rows in packed micro-batches (at most
    `micro_batch_size` rows and `micro_batch_tokens` tokens, pipeline/policy.py: micro_batches), one
    optimizer step per pass (gradient accumulation = number of micro-batches, set per call). The rows are
    taken in order, never shuffled, so a resumed run repeats a step exactly.
  - a rank's loss is the token mean over all its rows: each micro-batch mean is weighted by its share of the
    rank's response tokens (instead of DeepSpeed's 1/accumulation), so the gradient does not depend on
    micro_batch_size; DeepSpeed then averages the ranks' gradients. Metrics are weighted the same way.
  - every rank must run the same number of micro-batches (ZeRO reduces gradients, and at stage 3 gathers
    weights, collectively). `shard` pads a batch to a multiple of the world size with rows whose response
    is empty (no tokens: they add nothing to any masked mean) and gives rank r the rows r::world; each rank
    plans every rank's micro-batches and splits its own until it has as many as the rank with most.

`LearnerGroup` (driver side) reserves one placement-group bundle per rank (all or nothing, PACK), asks a probe
task in rank 0's bundle for its node IP and a free port (the torch.distributed rendezvous lives on rank 0),
starts the ranks, and fans every call out to all of them. Batches go to the ranks by ObjectRef: each rank
reads the whole table from the object store (zero-copy on its node) and keeps its own rows.

Checkpoints: engine.save_checkpoint/load_checkpoint on every rank (weights, optimizer, LR schedule, step
counters, plus a client_state dict), into the run's storage (pipeline/storage.py): a folder every node mounts,
or object storage, to which each rank uploads its own files.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.placement_group import remove_placement_group

from actors.placement import PlacementConfig, bundle, gpus_for, in_bundle, reserve
from pipeline.arrow import padded_to_ragged, ragged_to_numpy, ragged_to_padded
from pipeline.models import ModelConfig, check_device, load_causal_lm, resolve_model
from pipeline.precision import DTYPES, autocast, precision_record
from pipeline.storage import Storage
from pipeline.weight_sync import Bucket, SyncGroup, bucket_plan, send_buckets
from pipeline.policy import (LearnerConfig, critic_forward, critic_loss, load_critic, lr_lambda, micro_batches,
                             policy_forward, policy_loss, split_to)

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
ROLES = ("policy", "critic")
COLUMNS = {"policy": ("prompt_ids", "response_ids", "sample_logprobs", "ref_logprobs", "advantages"),
           "critic": ("prompt_ids", "response_ids", "returns")}


def deepspeed_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config dict; gradient_accumulation_steps is reset per train_step to the micro-batch count."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        # no "bf16" section: DeepSpeed's bf16 makes bf16 params; bf16 compute is autocast (PolicyLearner._autocast)
        "steps_per_print": 1 << 30,  # metrics come back from train_step instead
        "wall_clock_breakdown": False,
    }


def shard(table: pa.Table, rank: int, world_size: int) -> tuple[pa.Table, int]:
    """(rows rank::world_size of `table` padded to a multiple of world_size, how many of them are real).

    Padding rows copy the first row's prompt and scalars, with every other list column (response, per-token
    floats) empty: zero response tokens, so they weigh nothing in a masked mean.
    """
    if table.num_rows == 0:
        raise ValueError("the learner got an empty batch; the driver must send at least one row")
    missing = -table.num_rows % world_size
    if missing:
        first = table.slice(0, 1)
        columns = [pa.array([[]], column.type) if pa.types.is_list(column.type) and name != "prompt_ids" else column
                   for name, column in zip(first.column_names, first.columns)]
        padding = pa.Table.from_arrays(columns, schema=first.schema)
        table = pa.concat_tables([table] + [padding] * missing)
    real = len(range(rank, table.num_rows - missing, world_size))
    return table.take(np.arange(rank, table.num_rows, world_size)), real


class PolicyLearner:
    """One rank of a DeepSpeed data-parallel group training the policy (PPO) or the critic (value loss)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model: str,
                 model_cfg: ModelConfig, cfg: LearnerConfig, role: str = "policy"):
        check_device(model_cfg.device)
        model_path = resolve_model(model, model_cfg.cache_dir)  # on this rank's node
        if role not in ROLES:
            raise ValueError(f"learner role must be one of {ROLES}, got {role!r}")
        cfg.validate()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        os.environ.setdefault("DS_ACCELERATOR", model_cfg.device)  # read when deepspeed is first imported
        import deepspeed

        started = time.perf_counter()
        deepspeed.init_distributed(dist_backend=BACKENDS[model_cfg.device])
        self.init_distributed_s = time.perf_counter() - started
        self.rank, self.world_size, self.role, self.cfg = rank, world_size, role, cfg
        self.sync_group = None
        self.precision_record = {**precision_record(cfg.dtype, model_cfg.device, what="compute"), "weights": "float32"}
        self.precision_record["line"] += "; weights and optimizer state float32"
        if role == "policy":
            model, lr = load_causal_lm(model_path, "float32", model_cfg.device), cfg.lr
        else:
            model, lr = load_critic(model_path, model_cfg.device, cfg.seed), cfg.critic_lr
        # dropout stays off (eval mode): the PPO ratio compares one deterministic function before and after
        if cfg.gradient_checkpointing:  # transformers checkpoints only in train mode: zero every dropout first
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg))
        self.start_s = time.perf_counter() - started

    def precision(self) -> dict[str, str]:
        """The compute dtype this rank resolved (pipeline/precision.py: precision_record), weights float32."""
        return self.precision_record

    def _autocast(self):
        """Where every forward and loss of this rank runs: bf16 autocast, or plain float32."""
        return autocast(self.precision_record["dtype"], self.engine.device)

    def ready(self) -> dict:
        """Timings of this rank's start (seconds): process group (incl. DeepSpeed's comm-op build) and total."""
        return {"init_distributed_s": self.init_distributed_s, "start_s": self.start_s}

    # ---------------------------------------------------------------------------------------------- data

    def _columns(self, batch: pa.Table, names) -> dict[str, list[np.ndarray]]:
        """The named list columns as ragged numpy rows; per-token columns must match the response lengths."""
        missing = [name for name in names if name not in batch.column_names]
        if missing:
            raise ValueError(f"the {self.role} learner needs columns {missing}; the batch has {batch.column_names}")
        columns = {name: ragged_to_numpy(batch[name]) for name in names}
        lengths = [len(r) for r in columns["response_ids"]]
        for name in names:
            if name not in ("prompt_ids", "response_ids") and [len(r) for r in columns[name]] != lengths:
                raise ValueError(f"column {name!r} must hold one value per response token")
        return columns

    def _per_token(self, rows: list[np.ndarray]) -> torch.Tensor:
        """Ragged per-token floats -> a right-padded [B, T] float32 tensor on the engine's device."""
        return ragged_to_padded(rows)[0].to(self.engine.device)

    def _packs(self, table: pa.Table) -> list[list[int]]:
        return micro_batches(ragged_to_numpy(table["prompt_ids"]), ragged_to_numpy(table["response_ids"]),
                             self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)

    def _plan(self, batch: pa.Table, full_batch: bool) -> tuple[pa.Table, int, list[list[int]]]:
        """(this rank's rows, how many of them are real, its micro-batches). With full_batch every rank plans
        every rank's shard, so all run the same number of micro-batches (the collectives need it)."""
        if not full_batch:
            return batch, batch.num_rows, self._packs(batch)
        shards = [shard(batch, rank, self.world_size) for rank in range(self.world_size)]
        packs = [self._packs(table) for table, _ in shards]
        table, real = shards[self.rank]
        return table, real, split_to(packs[self.rank], max(map(len, packs)))

    # --------------------------------------------------------------------------------------------- train

    def train_step(self, batch: pa.Table, temperature: float = 1.0, full_batch: bool = False) -> dict[str, float]:
        """ppo_epochs optimizer steps on this rank's rows (all of `batch`, or its shard if full_batch).

        Policy columns: prompt_ids, response_ids, sample_logprobs (old), ref_logprobs, advantages.
        Critic columns: prompt_ids, response_ids, returns, and `values` (old values) when the batch has them;
        without them the critic's current values are computed first (the ones GAE used, if no step came since).
        """
        batch, _, packs = self._plan(batch, full_batch)
        names = COLUMNS[self.role] + (("values",) if self.role == "critic" and "values" in batch.column_names else ())
        columns = self._columns(batch, names)
        # gradient accumulation = micro-batches per pass (DeepSpeed's step bookkeeping)
        self.engine.set_train_batch_size(self.cfg.micro_batch_size * len(packs) * self.world_size)
        lr = self.engine.get_lr()[0]
        if self.role == "critic" and "values" not in columns:  # the values the returns were computed with
            columns["values"] = self._values(columns, packs)
        # token weights: w_m = tokens(m) / tokens(rank), so sum_m w_m * mean_m(loss) is the token mean over
        # all of this rank's rows, whatever the micro-batch size; padding rows have no tokens
        lengths = np.array([len(r) for r in columns["response_ids"]])
        weights = [lengths[rows].sum() / max(lengths.sum(), 1) for rows in packs]
        totals, grad_norms = {}, []
        for _ in range(self.cfg.ppo_epochs):
            for i, (rows, weight) in enumerate(zip(packs, weights)):
                self.engine.set_gradient_accumulation_boundary(i == len(packs) - 1)
                with self._autocast():
                    loss, metrics = self._loss({name: [column[i] for i in rows] for name, column in columns.items()},
                                               temperature)
                self.engine.backward(loss * weight, scale_wrt_gas=False)
                self.engine.step()  # an optimizer step only at the boundary
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + weight * value / self.cfg.ppo_epochs
            grad_norm = self.engine.get_global_grad_norm()
            grad_norms.append(float("nan") if grad_norm is None else float(grad_norm))
        return {**totals, "grad_norm": float(np.mean(grad_norms)), "lr": lr}

    def _loss(self, rows: dict[str, list[np.ndarray]], temperature: float):
        if self.role == "critic":
            values, mask = critic_forward(self.engine, rows["prompt_ids"], rows["response_ids"])
            old_values, returns = self._per_token(rows["values"]), self._per_token(rows["returns"])
            return critic_loss(values, old_values, returns, mask, self.cfg)
        logprobs, entropy, mask = policy_forward(self.engine, rows["prompt_ids"], rows["response_ids"], temperature,
                                                 entropy_grad=self.cfg.entropy_coef != 0, logit_chunk=self.cfg.logit_chunk)
        return policy_loss(logprobs, self._per_token(rows["sample_logprobs"]), self._per_token(rows["ref_logprobs"]),
                           self._per_token(rows["advantages"]), mask, self.cfg, entropy=entropy)

    # ----------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def _values(self, columns: dict[str, list[np.ndarray]], packs: list[list[int]]) -> list[np.ndarray]:
        out = [None] * len(columns["prompt_ids"])
        for rows in packs:
            with self._autocast():
                values, mask = critic_forward(self.engine, [columns["prompt_ids"][i] for i in rows],
                                              [columns["response_ids"][i] for i in rows])
            for i, value in zip(rows, padded_to_ragged(values, mask)):
                out[i] = value
        return out

    def values(self, batch: pa.Table, full_batch: bool = False) -> list[np.ndarray]:
        """Critic role: V(s_j) for every response token of every (real) row."""
        batch, real, packs = self._plan(batch, full_batch)
        return self._values(self._columns(batch, ("prompt_ids", "response_ids")), packs)[:real]

    @torch.no_grad()
    def logprobs(self, batch: pa.Table, temperature: float = 1.0, full_batch: bool = False) -> list[np.ndarray]:
        """Policy role: log pi(a_j | s_j) at `temperature` for every response token (the parity probe)."""
        batch, real, packs = self._plan(batch, full_batch)
        columns = self._columns(batch, ("prompt_ids", "response_ids"))
        out = [None] * batch.num_rows
        for rows in packs:
            with self._autocast():  # as in training: the ratio's log pi_theta and this probe agree
                logprobs, _, mask = policy_forward(self.engine, [columns["prompt_ids"][i] for i in rows],
                                                   [columns["response_ids"][i] for i in rows], temperature,
                                                   entropy_grad=False, logit_chunk=self.cfg.logit_chunk)
            for i, row in zip(rows, padded_to_ragged(logprobs, mask)):
                out[i] = row
        return out[:real]

    # --------------------------------------------------------------------------------- weights and state

    def state_dict_for_sync(self, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights (model.state_dict() names) as CPU tensors on rank 0, None elsewhere.

        A collective: every rank must call it. At ZeRO-3 each parameter is all-gathered for the copy.
        dtype None keeps the weights' float32 (the learner's weights are float32 whatever its compute dtype).
        """
        import deepspeed

        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            return {name: tensor.detach().to("cpu", dtype or tensor.dtype, copy=True)
                    for name, tensor in module.state_dict().items()}

    def sync_plan(self, dtype: str, bucket_bytes: int) -> list[Bucket]:
        """The broadcast plan of the policy's parameters: HF names, full shapes (also when ZeRO-3 shards them)."""
        params = [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in self.engine.module.named_parameters()]
        return bucket_plan(params, dtype, bucket_bytes)

    def join_sync_group(self, address: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0: host the weight-broadcast group (rank 0 of it; the engines are 1..E)."""
        self.sync_group = SyncGroup(address, port, 0, world_size, self.engine.device.type, timeout_s)

    def broadcast_weights(self, plan: list[Bucket], dtype: str) -> float:
        """Stream the weights to the engines (pipeline/weight_sync.py: send_buckets); a collective of every rank
        (ZeRO-3 gathers one parameter at a time); returns seconds."""
        import deepspeed

        start = time.perf_counter()
        params = dict(self.engine.module.named_parameters())

        @contextlib.contextmanager
        def gathered(name):
            with deepspeed.zero.GatheredParameters([params[name]], enabled=self.cfg.zero_stage == 3):
                yield params[name].data

        send_buckets(self.sync_group if self.rank == 0 else None, plan, dtype, gathered)
        return time.perf_counter() - start

    def save_checkpoint(self, storage: str, directory: str, client_state: dict | None = None) -> None:
        """Weights, optimizer and LR-schedule state of this rank into `directory` of the run's storage (a folder
        path or s3:// / gs:// URI); a collective: call on all ranks. Each rank writes (or uploads) its own files."""
        with Storage(storage).writable_dir(directory) as folder:
            # under one key: DeepSpeed hands back its own entries (ds_config, ...) mixed into the client state
            self.engine.save_checkpoint(folder, client_state={"endorl": client_state or {}})

    def load_checkpoint(self, storage: str, directory: str) -> dict:
        """Restore the latest checkpoint in `directory` of the run's storage; returns its client_state."""
        with Storage(storage).readable_dir(directory) as folder:
            path, client_state = self.engine.load_checkpoint(folder, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory!r} of {storage!r} (it needs a 'latest' "
                                    f"file). If the ranks ran on several nodes, the storage must be shared by all of them.")
        return client_state["endorl"]


PolicyLearnerActor = ray.remote(PolicyLearner)


@ray.remote(num_cpus=0)
def _address_and_free_port() -> tuple[str, int]:
    """This node's IP and a TCP port free on it right now (for the rendezvous on rank 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _wait_all(refs: list, what: str, timeout_s: float) -> list:
    """Results of a collective call on every rank, failing at the first error (the others would hang), and with a
    TimeoutError naming `what` when a rank gives no answer within `timeout_s` seconds (a wedged rank or collective)."""
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            raise TimeoutError(f"{what}: {len(pending)} of {len(refs)} learner ranks gave no answer within {timeout_s:g} s "
                               f"(a rank is wedged, or one of its collectives waits on a dead peer). Fix: look at the "
                               f"ranks' logs; raise the timeout if the call is just slow")
        ray.get(done)  # re-raises a rank's error now
    return ray.get(refs)


class LearnerGroup:
    """Driver-side handle of `cfg.ranks` learner actors forming one DeepSpeed group."""

    def __init__(self, model: str, model_cfg: ModelConfig, cfg: LearnerConfig, role: str = "policy",
                 placement: PlacementConfig | None = None, timeout_s: float = 1800):
        """model: a folder, HF id or bundled name, resolved by each rank on its own node. timeout_s: the longest any
        call on the ranks (start, train step, checkpoint, sync) may take before it is a TimeoutError naming it."""
        cfg.validate()
        lr_lambda(cfg)  # config errors surface here, before any actor starts
        if role not in ROLES:
            raise ValueError(f"learner role must be one of {ROLES}, got {role!r}")
        started = time.perf_counter()
        request = bundle(cfg.cpus_per_rank, gpus_for(model_cfg.device, cfg.gpus_per_rank), cfg.resources)
        self.placement = reserve(f"{role} learners", [request] * cfg.ranks, "PACK", placement or PlacementConfig())
        self.actors, self.role, self.timeout_s = [], role, timeout_s
        try:
            master_addr, master_port = self.rendezvous()  # the torch.distributed rendezvous lives on rank 0
            self.actors = [
                PolicyLearnerActor.options(num_cpus=request["CPU"], num_gpus=request.get("GPU", 0),
                                           resources={k: v for k, v in request.items() if k not in ("CPU", "GPU")},
                                           scheduling_strategy=in_bundle(self.placement, rank))
                .remote(rank, cfg.ranks, master_addr, master_port, model, model_cfg, cfg, role)
                for rank in range(cfg.ranks)]
            self.rank_timings = _wait_all([actor.ready.remote() for actor in self.actors], f"starting {role} learners",
                                          timeout_s)
        except Exception:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - started
        self.cfg = cfg

    def _call(self, method: str, *args, **kwargs) -> list:
        return _wait_all([getattr(actor, method).remote(*args, **kwargs) for actor in self.actors],
                         f"{self.role} learners: {method}", self.timeout_s)

    @staticmethod
    def _ref(batch) -> ray.ObjectRef:
        return batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)

    @staticmethod
    def _interleave(per_rank: list[list]) -> list:
        """Undo `shard`: rank r's rows are rows r, r + world, ... of the batch."""
        out = [None] * sum(len(rows) for rows in per_rank)
        for rank, rows in enumerate(per_rank):
            out[rank::len(per_rank)] = rows
        return out

    def train_step(self, batch: pa.Table | ray.ObjectRef, temperature: float = 1.0) -> dict[str, float]:
        """One train_step on every rank (rank r trains rows r::world); metrics averaged over ranks."""
        per_rank = self._call("train_step", self._ref(batch), temperature, full_batch=True)
        return {name: float(np.mean([m[name] for m in per_rank])) for name in per_rank[0]}

    def values(self, batch: pa.Table | ray.ObjectRef) -> list[np.ndarray]:
        return self._interleave(self._call("values", self._ref(batch), full_batch=True))

    def logprobs(self, batch: pa.Table | ray.ObjectRef, temperature: float = 1.0) -> list[np.ndarray]:
        return self._interleave(self._call("logprobs", self._ref(batch), temperature, full_batch=True))

    def state_dict_ref(self, dtype: str | torch.dtype | None = None) -> ray.ObjectRef:
        """ObjectRef of rank 0's full state dict; the dict itself stays in the object store."""
        refs = [actor.state_dict_for_sync.remote(dtype) for actor in self.actors]
        # Nones; a rank-0 failure breaks their gather too, so it surfaces here
        _wait_all(refs[1:], f"{self.role} learners: state_dict_for_sync", self.timeout_s)
        done, _ = ray.wait(refs[:1], fetch_local=False, timeout=self.timeout_s)  # done, but not copied to the driver
        if not done:
            raise TimeoutError(f"{self.role} learners: state_dict_for_sync: rank 0 gave no answer within {self.timeout_s:g} s")
        return refs[0]

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's node IP and a port free there now (for a group that rank 0 hosts)."""
        probe = _address_and_free_port.options(scheduling_strategy=in_bundle(self.placement, 0))
        return _wait_all([probe.remote()], f"{self.role} learners: rendezvous probe", self.timeout_s)[0]

    def sync_plan(self, dtype: str, bucket_bytes: int) -> list:
        return _wait_all([self.actors[0].sync_plan.remote(dtype, bucket_bytes)], f"{self.role} learners: sync_plan",
                         self.timeout_s)[0]

    def broadcast_weights_refs(self, plan: list, dtype: str) -> list[ray.ObjectRef]:
        """Every rank's part of a broadcast sync (the engines' receive_weights must run at the same time)."""
        return [actor.broadcast_weights.remote(plan, dtype) for actor in self.actors]

    def save_checkpoint(self, storage: str, directory: str, client_state: dict | None = None) -> None:
        self._call("save_checkpoint", storage, directory, client_state)

    def load_checkpoint(self, storage: str, directory: str) -> dict:
        return self._call("load_checkpoint", storage, directory)[0]

    def shutdown(self) -> None:
        """Kill the ranks and release their reservation (safe to call twice)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
