"""What a resume may change: the checkpoint's config against the new one, before any actor starts.

A resume continues a run; a field that changes what the run computes (steps move the LR schedule's end, seeds and
batch sizes change the samples, ranks and engines change the numerics) silently makes a different run. Such a
difference is refused unless --resume_force names it. Fields that only say where or how fast it runs are free.
"""
from __future__ import annotations

import yaml

# dotted names (a trailing '.' = everything under it) that do not change what the run computes
FREE = ("resume", "resume_force", "local", "storage", "export", "loggers", "wandb.", "wait_timeout_s", "max_failures", "faults.", "ray.", "placement.", "checkpoint_every", "eval_every",
        "sync.", "sync_check_every", "sync_tolerance", "scorer_cpus", "scorer_gpus", "scorer_resources", "sentence_rm_cpus",
        "sentence_rm_gpus", "sentence_rm_resources", "rollout.cpus_per_engine", "rollout.gpus_per_engine",
        "rollout.resources", "rollout.gpu_memory_utilization", "rollout.enforce_eager")
ABSENT = "(absent)"


def flatten(data: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; dict-valued leaves that are not sub-configs stay whole below their name."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and f"{prefix}{key}" not in LEAF_DICTS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


LEAF_DICTS = {"scorer_resources", "sentence_rm_resources", "rollout.resources"}


def is_free(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE)


def config_differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, checkpoint value, new value) for every field that changes the run, in the new config's order."""
    a, b = flatten(saved), flatten(new)
    fields = list(b) + [k for k in a if k not in b]
    return [(f, a.get(f, ABSENT), b.get(f, ABSENT)) for f in fields
            if not is_free(f) and a.get(f, ABSENT) != b.get(f, ABSENT)]


def check_resume_config(saved_yaml: str, new: dict, force: list[str], checkpoint: str) -> list[str]:
    """SystemExit listing every difference not named in `force`; returns the forced fields that did differ."""
    differences = config_differences(yaml.safe_load(saved_yaml) or {}, new)
    unknown = [f for f in force if f not in flatten(new) and f not in {d[0] for d in differences}]
    if unknown:
        raise SystemExit(f"--resume_force names {unknown}, which are not config fields. Fix: use dotted names "
                         f"such as steps,rollout.engines")
    refused = [d for d in differences if d[0] not in force]
    if refused:
        lines = "\n".join(f"  {field}: {old!r} -> {value!r}" for field, old, value in refused)
        names = ",".join(d[0] for d in differences)
        raise SystemExit(f"--resume: the config differs from the checkpoint's ({checkpoint}/config.yaml) in what the "
                         f"run computes:\n{lines}\nFix: resume with the checkpoint's values, or add "
                         f"--resume_force {names} if the change is intended.")
    return [d[0] for d in differences]
