"""Failures: what a run does when an actor dies, and a testing hook that kills one on purpose.

`--faults.kill ROLE:INDEX@STEP[:PHASE]` (comma-separated, off by default) is a TESTING HOOK: the driver kills
actor INDEX of ROLE with ray.kill while it works on STEP's PHASE, as a crash of its process would. What recovers:

  - rollout_engines (phase rollout): an engine that died, or did not answer within --faults.engine_timeout_s, is
    killed and replaced in its placement-group bundle; the replacement gets the learners' current weights (the sync
    is re-run on it, then the sync check's log-prob parity) and generates the dead engine's prompts again, with the
    same per-sample seeds (pipeline/seeds.py), so the step's batch is the one an uninterrupted run would have had.
  - scorers (phase score; the base-model scorers and the sentence RM): Ray restarts a dead scorer (max_restarts)
    and retries its batch on it (max_task_retries); a scorer is frozen, so its restarted copy scores alike.
  - policy_learners (phase train): a dead rank takes its DeepSpeed group down (the collectives cannot go on):
    LearnerGroupFailed; jobs.rlhf then restarts every actor from the newest complete checkpoint, up to
    --max_failures times, and the steps after it come out as an uninterrupted run's (the resume is exact).
An injected kill fires once per job: the steps redone after a restart do not hit it again.

`--faults.hang ROLE:INDEX@STEP[:PHASE]` (same form; rollout_engines and policy_learners) is the same hook for a
wedged actor: the actor blocks on a call queued ahead of its work and never answers. An engine that gives no answer
within --faults.engine_timeout_s is replaced as a dead one; a learner rank that gives none within --wait_timeout_s
fails its group's call with a TimeoutError naming it, and the run restarts from the checkpoint as for a dead rank.

Each failure is a `Failure` record in the run folder's failures.jsonl, with faults/* metrics in the step's row.
"""
from __future__ import annotations

import dataclasses
import re

from pipeline.config import ConfigError, opt

PHASES = {"rollout_engines": ("rollout",), "scorers": ("score",), "policy_learners": ("train",)}  # role -> phases a kill can hit (first: default)
HANG_ROLES = ("rollout_engines", "policy_learners")  # roles whose no-answer is noticed and recovered from
SPEC = re.compile(r"(?P<role>[a-z_]+):(?P<index>\d+)@(?P<step>\d+)(?::(?P<phase>[a-z_]+))?")


@dataclasses.dataclass(frozen=True)
class Fault:
    role: str
    index: int
    step: int
    phase: str
    action: str = "kill"  # kill: the process exits; hang: it blocks and never answers


def parse_fault(spec: str, action: str = "kill") -> Fault:
    """'rollout_engines:0@1' -> Fault('rollout_engines', 0, 1, 'rollout'); a bad spec is a ConfigError naming the field."""
    roles = PHASES if action == "kill" else HANG_ROLES
    match = SPEC.fullmatch(spec.strip())
    if not match:
        raise ConfigError(f"--faults.{action} {spec!r} is not ROLE:INDEX@STEP[:PHASE]. Fix: e.g. rollout_engines:0@1 "
                          f"or policy_learners:1@2:train (roles: {', '.join(roles)})")
    role, phase = match["role"], match["phase"]
    if role not in roles:
        raise ConfigError(f"--faults.{action} {spec!r}: role {role!r} is not one of {', '.join(roles)}")
    if phase is not None and phase not in PHASES[role]:
        raise ConfigError(f"--faults.{action} {spec!r}: a {role} {action} can hit phase {' or '.join(PHASES[role])}, "
                          f"not {phase!r}")
    return Fault(role, int(match["index"]), int(match["step"]), phase or PHASES[role][0], action)


@dataclasses.dataclass
class FaultsConfig:
    kill: list[str] = opt(help="TESTING HOOK, off by default: kill actors on purpose, ROLE:INDEX@STEP[:PHASE] "
                               "comma-separated, e.g. rollout_engines:0@1 or scorers:0@1:score (ROLE rollout_engines, "
                               "scorers or policy_learners, STEP counted from 0, PHASE by default the role's own: "
                               "rollout, score, train)",
                          factory=list)
    hang: list[str] = opt(help="TESTING HOOK, off by default: wedge actors on purpose (they block and never answer), "
                               "ROLE:INDEX@STEP[:PHASE] as for kill; ROLE rollout_engines or policy_learners",
                          factory=list)
    replace_engines: bool = opt(True, "replace a rollout engine that dies or does not answer, and generate its "
                                      "prompts again with the same seeds; false: the run stops with an error")
    engine_timeout_s: float = opt(0, "seconds a rollout call may take before its engine counts as wedged and is "
                                     "replaced; 0 = --wait_timeout_s")
    max_replacements: int = opt(2, "engine replacements within one rollout phase before the run stops")
    scorer_restarts: int = opt(2, "times Ray restarts each dead base-model scorer or sentence-RM actor "
                                  "(max_restarts) and retries its batch on it (max_task_retries); 0: the run stops")

    def __post_init__(self):
        # a bad spec fails when the config is read
        self.faults = [parse_fault(spec) for spec in self.kill] + [parse_fault(spec, "hang") for spec in self.hang]
        self.fired: set[Fault] = set()  # kills already made in this job
        if self.max_replacements < 0 or self.scorer_restarts < 0 or self.engine_timeout_s < 0:
            raise ConfigError("faults.max_replacements, faults.scorer_restarts and faults.engine_timeout_s must be "
                              ">= 0. Fix: e.g. --faults.max_replacements 2")

    def due(self, role: str, step, phase: str, action: str = "kill") -> list[int]:
        """Indexes of the `role` actors to kill (or hang) now, each fault once (held-out evaluations have a string
        step: never)."""
        now = [f for f in self.faults if (f.role, f.step, f.phase, f.action) == (role, step, phase, action)
               and f not in self.fired]
        self.fired.update(now)
        return [f.index for f in now]


class LearnerGroupFailed(RuntimeError):
    """A learner rank died (or gave no answer) at `step`, or a weight broadcast it hosts broke: its group cannot go
    on, every actor is restarted from the newest checkpoint. `actor` and `phase` name it in failures.jsonl."""

    def __init__(self, message: str, step: int, cause: str = "died", actor: str = "policy_learners",
                 phase: str = "train"):
        super().__init__(message)
        self.step, self.cause, self.actor, self.phase = step, cause, actor, phase


@dataclasses.dataclass
class Failure:
    """One failure and its recovery, as failures.jsonl records it."""
    actor: str          # ROLE_INDEX, e.g. rollout_engines_0
    step: int | str     # a training step, or 'heldout' (an evaluation)
    phase: str
    cause: str          # "died", "no answer within N s", "injected" (--faults.kill)
    recover_s: float    # from noticing it to the redone work being done
    rows_redone: int    # rollout rows generated again / scored again
    replacement: str = ""  # the new actor's id (engines) or pid (a restarted scorer)


def failure_metrics(failures: list[Failure]) -> dict[str, float]:
    """The faults/* numbers of a step's metrics row (none when nothing failed)."""
    if not failures:
        return {}
    return {"faults/count": float(len(failures)), "faults/recover_s": sum(f.recover_s for f in failures),
            "faults/rows_redone": float(sum(f.rows_redone for f in failures))}


def check_faults(cfg: FaultsConfig, counts: dict[str, int], steps: int) -> None:
    """Before any actor starts: every --faults.kill/hang names an actor the run has, at a step it runs (ValueError)."""
    for spec, fault in zip(cfg.kill + cfg.hang, cfg.faults):
        if fault.index >= counts[fault.role]:
            raise ConfigError(f"--faults.{fault.action} {spec!r}: the run has {counts[fault.role]} {fault.role} "
                              f"(index from 0)")
        if fault.step >= steps:
            raise ConfigError(f"--faults.{fault.action} {spec!r}: step {fault.step} is not run (--steps {steps}, from 0)")
