"""The rollout engines of an RL run: the ones sampling now, the ones on their way, and what a lost one becomes.

Fixed (--rollout.engines N): N engines in one SPREAD placement group; a lost engine is replaced in its bundle.
Elastic (--rollout.engines MIN..MAX): MIN engines start, each in a placement group of its own, and MAX-MIN more
groups are requested without waiting: pending, they are the demand an autoscaler adds nodes for. Before each
rollout (`grow`) an engine starts in every group that became ready, and joins the pool once its model has loaded
(the caller syncs the weights into it and checks parity first). A lost engine is dropped while more than MIN
remain (its group removed and requested again, so a new node brings it back), and replaced in its slot otherwise.
"""
from __future__ import annotations

import dataclasses

import ray
from ray.util.placement_group import remove_placement_group

from actors.placement import node_of
from actors.rollout import request_engine_slot, reserve_engine_slots, start_engine


@dataclasses.dataclass
class Engine:
    actor: object   # the RolloutActor handle
    slot: tuple     # (placement group, bundle index)
    index: int      # its seed offset and core block (actors/rollout.py: start_engine)
    ready: object = None  # __ray_ready__ ref while its model loads


class EnginePool:
    def __init__(self, cfg):
        """cfg: the RL config (model, rollout, ray, placement). Returns with the first cfg.rollout.min_engines
        started (not yet ready: the caller waits on `ready_refs` with its other actors)."""
        self.cfg, self.started, self.pending, self.loading = cfg, 0, [], []
        self.engines = [self.start(slot) for slot in reserve_engine_slots(cfg.model.device, cfg.rollout, cfg.placement)]
        self.later = []  # node_of records of every engine started after the first ones (for their logs)
        for _ in range(cfg.rollout.max_engines - cfg.rollout.min_engines):
            self.request_slot()

    @property
    def actors(self) -> list:
        return [engine.actor for engine in self.engines]

    def start(self, slot: tuple, index: int | None = None) -> Engine:
        """An engine in `slot`: with `index`, a replacement taking that index's seed and cores; else a new index."""
        if index is None:
            index, self.started = self.started, self.started + 1
        cfg = self.cfg
        actor = start_engine(cfg.model.name, cfg.rollout_dtype, cfg.model.device, cfg.rollout, cfg.ray, slot, index,
                             cfg.model.cache_dir)
        return Engine(actor, slot, index, actor.__ray_ready__.remote())

    def request_slot(self) -> None:
        group = request_engine_slot(self.cfg.model.device, self.cfg.rollout)
        self.pending.append((group, group.ready()))

    def grow(self) -> list[Engine]:
        """Elastic: start an engine in each requested group that is ready now; returns the loading engines whose
        model has loaded, now part of the pool (the caller syncs and checks them before they sample)."""
        for group, ready in list(self.pending):
            if ray.wait([ready], timeout=0)[0]:
                self.pending.remove((group, ready))
                self.loading.append(self.start((group, 0)))
        joined = []
        for engine in list(self.loading):
            if not ray.wait([engine.ready], timeout=0)[0]:
                continue
            self.loading.remove(engine)
            try:
                ray.get(engine.ready)
            except ray.exceptions.RayActorError:  # it died loading (its node went): ask for its room again
                self.release(engine)
                continue
            self.engines.append(engine)
            joined.append(engine)
        return joined

    def lose(self, actor) -> Engine | None:
        """`actor` is lost: dropped while more than the minimum remain (None), else replaced in its slot (the new
        Engine, loading: the caller waits for it)."""
        position = self.actors.index(actor)
        engine = self.engines.pop(position)
        if self.cfg.rollout.elastic and len(self.engines) >= self.cfg.rollout.min_engines:
            self.release(engine)
            return None
        ray.kill(engine.actor)  # a wedged one frees its bundle; a dead one: nothing to do
        new = self.start(engine.slot, engine.index)
        self.engines.insert(position, new)
        return new

    def release(self, engine: Engine) -> None:
        """Kill an elastic engine, free its group, and request one again (pending demand until there is room)."""
        ray.kill(engine.actor)
        remove_placement_group(engine.slot[0])
        self.request_slot()

    def note_started(self, actors: list) -> None:
        """Where engines started after the first ones run (replacements, additions), for their logs."""
        self.later += ray.get([node_of(actor) for actor in actors], timeout=self.cfg.wait_timeout_s)

    def shutdown(self) -> None:
        engines = self.engines + self.loading
        for engine in engines:
            ray.kill(engine.actor)
        groups = {id(g): g for g in [e.slot[0] for e in engines] + [g for g, _ in self.pending]}
        for group in groups.values():
            try:
                remove_placement_group(group)
            except Exception:  # already removed
                pass
        self.engines, self.loading, self.pending = [], [], []
