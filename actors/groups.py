"""The cluster side of the RL loop: every worker group, behind the small interface `pipeline.driver` uses.

Batches stay in Ray's object store: methods take and return ObjectRefs of Arrow tables, and only metric dicts
come back to the driver. Each method returns when its phase is done, so the driver can time phases.
Each role has its own placement group (actors/placement.py): engines and scorers SPREAD, learner ranks PACK.
Checkpoints go to the run's storage: every rank writes its own files, then the driver checks that it sees all of
them and writes the marker that makes the checkpoint complete.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import ray
from ray.util.placement_group import remove_placement_group

from actors.base_model import BaseModelActor
from actors.learner import LearnerGroup
from actors.placement import bundle, gpus_for, in_bundle, node_of, reserve
from actors.remote_reward import RemoteRewardActor
from actors.engines import EnginePool
from actors.sentence_rm import SentenceRMActor
from pipeline.arrow import parquet_bytes, ragged_to_numpy
from pipeline.driver import check_parity, sync_check_tolerance
from pipeline.experience import build_experience
from pipeline.faults import Failure, LearnerGroupFailed
from pipeline.precision import sync_dtype
from pipeline.rollout import logprob_parity, prompt_probe
from pipeline.runlog import MARKER
from pipeline.seeds import HELDOUT, prompt_seeds
from pipeline.storage import Storage


@ray.remote(num_cpus=0)
class BatchOps:
    """The driver's small table operations, in one long-lived process on the policy learners' node: the experience
    table is then local to the learners, and no step pays for a new worker. (As 0-CPU tasks they ran on whatever
    node had a slot, often one whose idle workers Ray kills after a second: 1.3 s a call on the multi-node bench.)"""

    def concat(self, *tables: pa.Table) -> pa.Table:
        return pa.concat_tables(tables)

    @ray.method(num_returns=2)
    def experience(self, scored: pa.Table, values: list | None, cfg, group_size: int, kl_coef: float,
                   kl_in_reward: bool):
        return build_experience(scored, cfg, group_size, kl_coef, kl_in_reward, values)


def wait(refs: list, what: str, timeout_s: float) -> list:
    """Block until every ref is computed, without copying the results to the driver; a wedged actor is a
    TimeoutError naming the phase after `timeout_s` seconds, never a hang."""
    done, pending = ray.wait(refs, num_returns=len(refs), fetch_local=False, timeout=timeout_s)
    if pending:
        raise TimeoutError(f"{what}: {len(pending)} of {len(refs)} calls not done after {timeout_s:g} s (an actor is "
                           f"wedged or dead). Fix: look at that actor's log; raise --wait_timeout_s if it is just slow")
    return refs


def get(refs, what: str, timeout_s: float):
    """ray.get with `wait`'s timeout and message."""
    wait(refs if isinstance(refs, list) else [refs], what, timeout_s)
    return ray.get(refs)


def crash(actor) -> None:
    """--faults.kill: the actor's process exits at once, as a crash would (queued calls behind it see it die). Never
    retried: on a scorer (max_task_retries) a retry would crash its restarted process too."""
    actor.__ray_call__.options(max_task_retries=0).remote(lambda _self: os._exit(1))


def wedge(actor) -> None:
    """--faults.hang: the actor blocks on this call, queued ahead of its work, and never answers (until killed)."""
    actor.__ray_call__.options(max_task_retries=0).remote(lambda _self: threading.Event().wait())


def pid_of(actor) -> ray.ObjectRef:
    """The actor's process id: a new one means Ray restarted it."""
    return actor.__ray_call__.remote(lambda _self: os.getpid())


def alive(actor, timeout_s: float) -> bool:
    """Whether an idle actor answers; a dead one raises RayActorError at once."""
    try:
        get(actor.__ray_ready__.remote(), "ping", timeout_s)
        return True
    except ray.exceptions.RayActorError:
        return False


class RLWorkers:
    """vLLM engines, frozen base-model scorers, policy learners and (for GAE) critic learners."""

    def __init__(self, cfg):
        """Every actor resolves cfg.model.name on its own node; nothing of the driver's disk is handed out."""
        self.cfg, self.groups, self.pool, self.scorers, self.sentence_rm = cfg, [], None, [], None
        self.failures, self.step, self.shard_rows = [], None, []  # Failure records; the step and rows in flight
        self.remote_reward = None
        self.learner = self.critic = self.batch_ops = None
        device, model = cfg.model.device, cfg.model.name
        try:
            self.pool = EnginePool(cfg)  # actors/engines.py: fixed or elastic, replaced or dropped when lost
            scorer = bundle(cfg.scorer_cpus, gpus_for(device, cfg.scorer_gpus), cfg.scorer_resources)
            roles = [("scorers", scorer, cfg.scorers)]
            if cfg.advantage.sentence_rm_weight:
                roles.append(("sentence RM", bundle(cfg.sentence_rm_cpus, gpus_for(device, cfg.sentence_rm_gpus),
                                                    cfg.sentence_rm_resources), 1))
            for role, request, count in roles:
                group = reserve(role, [request] * count, "SPREAD", cfg.placement)
                self.groups.append(group)
                custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU")}
                # frozen models: Ray restarts a dead one and retries its batch on the new process
                options = [dict(num_cpus=request["CPU"], num_gpus=request.get("GPU", 0), resources=custom,
                                scheduling_strategy=in_bundle(group, i), max_restarts=cfg.faults.scorer_restarts,
                                max_task_retries=cfg.faults.scorer_restarts) for i in range(count)]
                if role == "scorers":
                    self.scorers = [BaseModelActor.options(**o).remote(cfg.model, cfg.reward) for o in options]
                    if getattr(cfg.reward, "remote_url", ""):  # next to the first scorer; it asks for no CPU
                        self.remote_reward = RemoteRewardActor.options(scheduling_strategy=in_bundle(group, 0)).remote(
                            cfg.model, cfg.reward)
                else:
                    self.sentence_rm = SentenceRMActor.options(**options[0]).remote(cfg.sentence_rm, device)
            self.learner = LearnerGroup(model, cfg.model, cfg.learner, role="policy", placement=cfg.placement,
                                        timeout_s=cfg.wait_timeout_s)
            if cfg.advantage.estimator == "gae":
                self.critic = LearnerGroup(model, cfg.model, cfg.learner, role="critic", placement=cfg.placement,
                                           timeout_s=cfg.wait_timeout_s)
            self.batch_ops = BatchOps.options(scheduling_strategy=in_bundle(self.learner.placement, 0)).remote()
            actors = self.scorers + self.engines + [a for a in (self.sentence_rm, self.batch_ops, self.remote_reward) if a]
            wait([actor.__ray_ready__.remote() for actor in actors], "starting actors", cfg.wait_timeout_s)
            self.scorer_pids = get([pid_of(a) for a in self.scoring_actors()], "scorer pids", cfg.wait_timeout_s)
        except Exception:
            self.shutdown()
            raise
        self.last_batch, self.last_prompts, self.sync_members, self.sync_plan = None, None, [], None

    @property
    def engines(self) -> list:
        """The rollout engines sampling now (an elastic run's count changes between steps)."""
        return self.pool.actors if self.pool else []

    @property
    def replaced(self) -> list[dict]:
        """Where every engine started after the first ones runs (replacements, elastic additions), for its log."""
        return self.pool.later if self.pool else []

    def scoring_actors(self) -> list:
        return self.scorers + ([self.sentence_rm] if self.sentence_rm else [])

    def nodes(self) -> dict[str, list[dict]]:
        """Where every actor runs (role -> one {node_id, ip, host} per actor), for the run log."""
        roles = {"rollout_engines": self.engines, "scorers": self.scorers, "policy_learners": self.learner.actors}
        if self.sentence_rm:
            roles["sentence_rm"] = [self.sentence_rm]
        if self.critic:
            roles["critic_learners"] = self.critic.actors
        return {role: get([node_of(actor) for actor in actors], "nodes", self.cfg.wait_timeout_s)
                for role, actors in roles.items()}

    @functools.cached_property
    def precision(self) -> dict[str, list[dict]]:
        """The dtype every model actor resolved on its own node (role -> one record per actor, pipeline/precision.py)."""
        roles = {"rollout_engines": self.engines, "scorers": self.scorers, "policy_learners": self.learner.actors}
        if self.critic:
            roles["critic_learners"] = self.critic.actors
        return {role: get([actor.precision.remote() for actor in actors], "precision", self.cfg.wait_timeout_s)
                for role, actors in roles.items()}

    def inject_faults(self, role: str, step, phase: str, actors: list) -> None:
        """--faults.kill and --faults.hang (testing hooks): crash or wedge the `role` actors due at this step's phase."""
        for i in self.cfg.faults.due(role, step, phase):
            crash(actors[i])
        for i in self.cfg.faults.due(role, step, phase, "hang"):
            wedge(actors[i])

    def generate(self, prompts: pa.Table, step: int | str, n_samples: int) -> list:
        """Prompts split across the engines alive at the start of the step, in contiguous shards (a prompt's samples
        stay together). Every sample has its own seed, hashed from (run seed, step, prompt id, sample index): the
        rollout does not depend on the split, so a lost engine's shard, generated again on its replacement or (elastic)
        on the engines that remain, comes out as it would have."""
        if self.cfg.rollout.elastic:
            self.admit_engines([e.actor for e in self.pool.grow()], prompts, "added engine")
        seeds = prompt_seeds(self.cfg.seed, step, prompts["prompt_id"].to_pylist(), n_samples)
        self.last_prompts, engines = prompts, self.engines
        shards = [idx for idx in np.array_split(np.arange(prompts.num_rows), len(engines)) if len(idx)]
        owner = dict(enumerate(engines[:len(shards)]))  # shard -> the engine generating it

        def call(s):
            return owner[s].generate.remote(prompts.take(shards[s]), n_samples=n_samples,
                                            seeds=[seeds[j] for j in shards[s]])

        self.step, self.shard_rows = step, [len(idx) * n_samples for idx in shards]
        self.inject_faults("rollout_engines", step, "rollout", engines)
        calls, lost, replacements = {s: call(s) for s in owner}, {}, 0
        names = {actor: f"rollout_engines_{i}" for i, actor in enumerate(engines)}  # in failures.jsonl
        while failed := self.lost_engines(calls, owner, step):
            replacements += len(failed)
            if replacements > self.cfg.faults.max_replacements:
                named = {self.engines.index(actor): cause for actor, cause in failed.items()}
                raise RuntimeError(f"rollout at step {step}: engine(s) {named} after "
                                   f"{replacements - len(failed)} replacements, --faults.max_replacements is "
                                   f"{self.cfg.faults.max_replacements}. Fix: raise it, or look at the engines' logs "
                                   f"in STORAGE/logs/")
            new = {actor: self.pool.lose(actor) for actor in failed}  # None: dropped (elastic, more than min left)
            self.admit_engines([e.actor for e in new.values() if e], prompts, "replacement engine")
            survivors = self.engines
            for k, s in enumerate([s for s in owner if owner[s] in failed]):
                dead = owner[s]
                lost.setdefault(names[dead], (failed[dead], time.perf_counter(), []))[2].append(s)
                owner[s] = new[dead].actor if new[dead] else survivors[k % len(survivors)]
                names.setdefault(owner[s], names[dead])  # a replacement is known by the name of the engine it replaces
                calls[s] = call(s)  # the same prompts and seeds
        for name, (cause, noticed, redone) in lost.items():
            now_on = ", ".join(sorted({owner[s]._actor_id.hex() for s in redone}))
            self.failures.append(Failure(name, step, "rollout", cause, time.perf_counter() - noticed,
                                         sum(len(shards[s]) for s in redone) * n_samples, now_on))
        return [calls[s] for s in sorted(calls)]

    def lost_engines(self, calls: dict, owner: dict, step) -> dict:
        """Engine handle -> why its calls are lost: it died, or gave no answer within --faults.engine_timeout_s."""
        timeout = self.cfg.faults.engine_timeout_s or self.cfg.wait_timeout_s
        done, _ = ray.wait(list(calls.values()), num_returns=len(calls), fetch_local=False, timeout=timeout)
        lost = {}
        for s, ref in calls.items():
            if owner[s] not in lost and (ref not in done or not alive(owner[s], self.cfg.wait_timeout_s)):
                lost[owner[s]] = "died" if ref in done else f"no answer within {timeout:g} s"
        if lost and not self.cfg.faults.replace_engines:
            named = {self.engines.index(actor): cause for actor, cause in lost.items()}
            raise RuntimeError(f"rollout at step {step}: engine(s) {named} and --faults.replace_engines is false. "
                               f"Fix: --faults.replace_engines true, or look at the engine's log in STORAGE/logs/")
        return lost

    def admit_engines(self, actors: list, prompts: pa.Table, what: str) -> None:
        """New engines (replacements, or elastic ones that joined) get the current weights before they sample: the
        weight sync, re-run for every engine (a new group; the others get the weights they hold), then each new
        one's log-prob parity with the learners."""
        if not actors:
            return
        cfg = self.cfg
        wait([actor.__ray_ready__.remote() for actor in actors], f"starting {what}s", cfg.wait_timeout_s)
        self.pool.note_started(actors)
        self.sync_weights()
        if self.last_batch is None and prompts is None:  # a resume's first sync: no batch or prompts to probe yet
            return
        probe = prompt_probe(ragged_to_numpy(prompts["prompt_ids"])) if self.last_batch is None else None
        for actor in actors:
            i = self.engines.index(actor)
            check_parity(self.check_sync(engine=i, probe=probe), sync_check_tolerance(cfg, self.precision), f"{what} {i}")

    def score(self, rollout_refs: list) -> ray.ObjectRef:
        """Endogenous rewards + reference log-probs (one forward pass) per shard, then the sentence RM's dense
        rewards when it is a reward source; one table ref back."""
        started = time.perf_counter()
        for i in self.cfg.faults.due("scorers", self.step, "score"):
            crash(self.scorers[i])  # before its calls: they are retried on the restarted process
        scored = [self.scorers[i % len(self.scorers)].score.remote(ref) for i, ref in enumerate(rollout_refs)]
        if self.remote_reward:  # --reward.remote_url: the reward from the servers, the KL reference kept local
            scored = [self.remote_reward.score.remote(ref) for ref in scored]
        if self.sentence_rm:
            scored = [self.sentence_rm.score.remote(ref) for ref in scored]
        out = wait([self.batch_ops.concat.remote(*scored)], "score", self.cfg.wait_timeout_s)[0]
        self.note_restarts(started)
        return out

    def note_restarts(self, started: float) -> None:
        """A scorer whose process changed was restarted by Ray during this score phase: a Failure, with the rows
        of every batch that was sent to it (all retried). One Ray restart too many stops the run, naming the option."""
        actors = self.scoring_actors()
        try:
            pids = get([pid_of(a) for a in actors], "scorer pids", self.cfg.wait_timeout_s)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"a scorer died at step {self.step} (score) after --faults.scorer_restarts "
                               f"{self.cfg.faults.scorer_restarts} restarts. Fix: raise --faults.scorer_restarts, or "
                               f"look at the scorer's log in STORAGE/logs/: {e}") from None
        for i, (old, new) in enumerate(zip(self.scorer_pids, pids)):
            if old != new:
                role, index = ("scorers", i) if i < len(self.scorers) else ("sentence_rm", 0)
                rows = sum(self.shard_rows) if role == "sentence_rm" else sum(self.shard_rows[i::len(self.scorers)])
                self.failures.append(Failure(f"{role}_{index}", self.step, "score", "died",
                                             time.perf_counter() - started, rows, f"pid {new}"))
        self.scorer_pids = pids

    def take_failures(self) -> list[Failure]:
        """The failures recovered from since the last call (for the run log)."""
        failures, self.failures = self.failures, []
        return failures

    def values(self, scored_ref) -> list | None:
        return self.critic.values(scored_ref) if self.critic else None

    def make_experience(self, scored_ref, values) -> tuple[ray.ObjectRef, dict]:
        kl_in_reward = self.cfg.learner.kl_mode == "k1_reward"
        experience, metrics = self.batch_ops.experience.remote(scored_ref, values, self.cfg.advantage,
                                                               self.cfg.rollout.n_samples, self.cfg.learner.kl_coef,
                                                               kl_in_reward)
        self.last_batch = experience
        return experience, get(metrics, "experience", self.cfg.wait_timeout_s)

    def train(self, experience_ref) -> dict:
        self.inject_faults("policy_learners", self.step, "train", self.learner.actors)
        try:
            policy = self.learner.train_step(experience_ref, self.cfg.rollout.temperature)
        except ray.exceptions.RayActorError as e:  # a rank died: the group's collectives cannot go on
            raise LearnerGroupFailed(f"a policy learner rank died at step {self.step} (train): "
                                     f"{str(e).splitlines()[0][:200]}", self.step) from e
        except TimeoutError as e:  # a rank is wedged (a collective waits on a peer that hangs): the same remedy
            raise LearnerGroupFailed(f"a policy learner rank gave no answer at step {self.step} (train): {e}. "
                                     f"Raise --wait_timeout_s if the step is just slow", self.step,
                                     f"no answer within {self.cfg.wait_timeout_s:g} s") from e
        metrics = {f"policy/{k}": v for k, v in policy.items()}
        if self.critic:
            metrics.update({f"critic/{k}": v for k, v in self.critic.train_step(experience_ref).items()})
        return metrics

    def sync_weights(self) -> float:
        """Learner -> every engine: buckets broadcast over a torch.distributed group (--sync.mode broadcast), or
        rank 0's full state dict through the object store (--sync.mode object_store, the fallback); seconds.
        An engine lost since its last call is dropped or replaced first: a collective cannot wait for it. One lost
        during the broadcast breaks the collective on every member: the run restarts from its newest checkpoint."""
        self.drop_lost_engines()
        try:
            return self.broadcast_weights()
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise LearnerGroupFailed(f"the weight sync at step {self.step} broke ({str(e).splitlines()[0][:200]}); "
                                     f"an engine or learner rank 0 was lost during the broadcast", self.step,
                                     "broadcast broke", actor="weight_sync", phase="sync") from e

    def broadcast_weights(self) -> float:
        dtype = sync_dtype(self.precision["rollout_engines"])  # bf16 when every engine runs bf16: half the bytes
        if self.cfg.sync.mode == "object_store":
            state_ref = self.learner.state_dict_ref(dtype)
            return max(get([engine.load_weights.remote(state_ref) for engine in self.engines],
                           "sync (engine load_weights)", self.cfg.wait_timeout_s))
        if self.sync_members != self.engines:  # the first sync, or the engines changed: a new group
            self.sync_plan = self.learner.sync_plan(dtype, int(self.cfg.sync.bucket_mb * 2 ** 20))
            address, port = self.learner.rendezvous()
            world, timeout = len(self.engines) + 1, self.cfg.wait_timeout_s
            get([self.learner.actors[0].join_sync_group.remote(address, port, world, timeout)]
                + [engine.join_sync_group.remote(address, port, i + 1, world, timeout)
                   for i, engine in enumerate(self.engines)], "sync (joining the broadcast group)", timeout)
            self.sync_members = list(self.engines)
        refs = (self.learner.broadcast_weights_refs(self.sync_plan, dtype)
                + [engine.receive_weights.remote(self.sync_plan, dtype) for engine in self.engines])
        return max(get(refs, "sync (bucketed broadcast)", self.cfg.wait_timeout_s))

    def drop_lost_engines(self) -> None:
        """Engines that died since their last call (a node lost between rollouts): dropped while an elastic run
        keeps its minimum, else replaced; nothing of theirs is redone (their rollouts were done)."""
        started = time.perf_counter()
        lost = [(i, actor) for i, actor in enumerate(self.engines) if not alive(actor, self.cfg.wait_timeout_s)]
        if lost and not self.cfg.faults.replace_engines:
            raise RuntimeError(f"before the weight sync at step {self.step}: engine(s) {[i for i, _ in lost]} died and "
                               f"--faults.replace_engines is false. Fix: --faults.replace_engines true")
        new = [self.pool.lose(actor) for _, actor in lost]
        self.admit_engines([engine.actor for engine in new if engine], self.last_prompts, "replacement engine")
        for (i, _), engine in zip(lost, new):
            self.failures.append(Failure(f"rollout_engines_{i}", self.step, "sync", "died", time.perf_counter() - started,
                                         0, engine.actor._actor_id.hex() if engine else "dropped"))

    def check_sync(self, rows: int = 2, engine: int = 0, probe: pa.Table | None = None) -> float:
        """Max |log-prob difference| between an engine and the learners on the last batch's first rows (or `probe`)."""
        if probe is None:
            probe = get(self.last_batch, "sync check (batch)", self.cfg.wait_timeout_s).slice(0, rows).select(["prompt_ids", "response_ids"])
        prompts = [p.tolist() for p in ragged_to_numpy(probe["prompt_ids"])]
        responses = [r.tolist() for r in ragged_to_numpy(probe["response_ids"])]
        engine_logp = get(self.engines[engine].token_logprobs.remote(prompts, responses), f"sync check (engine {engine})",
                          self.cfg.wait_timeout_s)
        return logprob_parity(engine_logp, self.learner.logprobs(probe, temperature=1.0))

    def heldout_reward(self, prompts: pa.Table, save_as: str = "") -> dict:
        """Samples of the held-out prompts from the current policy, scored like training rollouts. The seed is
        domain (pipeline.seeds.HELDOUT) is the same at every evaluation, so successive evaluations differ by the policy, not by the noise. The
        samples (token ids, reward) go to `save_as` in the run's storage, for judging the policy afterwards."""
        scored = get(self.score(self.generate(prompts, step=HELDOUT, n_samples=self.cfg.heldout_samples)), "held-out evaluation",
                     self.cfg.wait_timeout_s)
        if save_as:
            kept = [c for c in ("prompt_id", "prompt_ids", "response_ids", "finished", "reward") if c in scored.column_names]
            Storage(self.cfg.storage).write_bytes(save_as, parquet_bytes(scored.select(kept)))
        lengths = [len(r) for r in ragged_to_numpy(scored["response_ids"])]
        metrics = {"heldout/reward": float(np.mean(scored["reward"].to_numpy())),
                   "heldout/response_length": float(np.mean(lengths))}
        if "sentence_reward" in scored.column_names:
            metrics["heldout/sentence_rm"] = float(np.mean(scored["sentence_reward"].to_numpy()))
        return metrics

    def save(self, path: str, state: dict) -> None:
        """Every rank writes its shard into `path` of the run's storage; the driver then checks it sees them all
        (a folder on one node's own disk would not hold the other nodes' shards) and writes the marker last."""
        storage = Storage(self.cfg.storage)
        groups = [("policy", self.learner)] + ([("critic", self.critic)] if self.critic else [])
        for role, group in groups:
            group.save_checkpoint(storage.location, f"{path}/{role}", state)
            missing = missing_shards(storage, f"{path}/{role}", group.cfg)
            if missing:
                raise RuntimeError(f"checkpoint {storage.location}/{path}/{role} is missing {missing} as seen from the "
                                   f"driver: the learner ranks wrote to a disk this node does not share. Fix: --storage "
                                   f"on a filesystem every node mounts, or object storage (s3://, gs://).")
        storage.write_text(f"{path}/{MARKER}", json.dumps(state))  # last, atomic: marks the checkpoint complete

    def load(self, path: str) -> dict:
        storage = Storage(self.cfg.storage)
        self.learner.load_checkpoint(storage.location, f"{path}/policy")
        if self.critic:
            self.critic.load_checkpoint(storage.location, f"{path}/critic")
        return json.loads(storage.read_text(f"{path}/{MARKER}"))

    def shutdown(self) -> None:
        for group in (self.learner, self.critic):
            if group:
                group.shutdown()
        if self.pool:
            self.pool.shutdown()
        for actor in self.scorers + [a for a in (self.sentence_rm, self.batch_ops, self.remote_reward) if a]:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []


def missing_shards(storage: Storage, path: str, cfg) -> list[str]:
    """The files of a DeepSpeed checkpoint at `path` that are not there: the 'latest' tag, the model states, and
    (ZeRO >= 1) one optimizer-state file per rank."""
    if not storage.exists(f"{path}/latest"):
        return ["latest"]
    tag = storage.read_text(f"{path}/latest").strip()
    names = storage.listdir(f"{path}/{tag}")
    missing = [] if any(name.endswith("model_states.pt") for name in names) else [f"{tag}/*model_states.pt"]
    if cfg.zero_stage > 0:
        missing += [f"{tag}/*zero_pp_rank_{rank}_*optim_states.pt" for rank in range(cfg.ranks)
                    if not any(f"zero_pp_rank_{rank}_" in name and name.endswith("optim_states.pt") for name in names)]
    return missing
