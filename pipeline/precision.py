"""Which floating-point precision a model runs in: `auto` resolves to what the hardware computes natively.

    auto -> bfloat16  on a GPU with bf16 (torch.cuda.is_bf16_supported(); every GPU since Ampere),
                      or a CPU whose /proc/cpuinfo flags hold avx512_bf16 or amx_bf16 (native bf16 matmuls)
         -> float32   otherwise: on an AVX2-only CPU (e.g. an AMD EPYC before Zen 4) bf16 is emulated,
                      and was measured 2-3x slower than float32 (issue 11)

Resolution happens in the process that runs the model (an actor, on its own node): the driver may be a CPU
head node of a GPU cluster. Explicit `float32` / `bfloat16` pass through unchanged. Every model actor reports
its `precision_record` so the job can print and log what was really used.

Learners: weights and optimizer state are always float32; a bf16 compute dtype means the forward and the loss
run under torch.autocast (`autocast`), so an lr-sized update is added to float32 weights and never rounded away.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

DType = Literal["auto", "float32", "bfloat16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
CPUINFO = "/proc/cpuinfo"


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo text (every core of one machine has the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def read_cpu_flags(path: str = CPUINFO) -> set[str]:
    """This machine's CPU flags; empty where there is no /proc/cpuinfo (not Linux): float32 is then chosen."""
    try:
        with open(path) as fh:
            return parse_cpu_flags(fh.read())
    except OSError:
        return set()


def _cuda_bf16() -> bool | None:
    """Whether this process's GPU computes bf16; None when no GPU is visible here (nothing to check)."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None


def resolve(requested: str, device: str, cpu_flags: set[str] | None = None,
            cuda_bf16: bool | None = None) -> tuple[str, str]:
    """(dtype, why) for `requested` on `device`. cpu_flags / cuda_bf16: None = read from this machine."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, got {requested!r}. Fix: auto")
    if device.startswith("cuda"):
        supported = _cuda_bf16() if cuda_bf16 is None else cuda_bf16
        why = {True: "GPU has bf16", False: "GPU has no bf16", None: "cuda; bf16 not checked on this node"}[supported]
        if requested == "auto":
            return ("float32" if supported is False else "bfloat16"), why
        return requested, why
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    native = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    why = f"CPU has {', '.join(native)}" if native else f"CPU has no {' or '.join(BF16_CPU_FLAGS)}"
    if requested == "auto":
        return ("bfloat16" if native else "float32"), why
    if requested == "bfloat16" and not native:
        why += ": bf16 is emulated, slower than float32"
    return requested, why


def resolve_dtype(requested: str, device: str, cpu_flags: set[str] | None = None,
                  cuda_bf16: bool | None = None) -> str:
    """'float32' or 'bfloat16': `requested` itself, or what `auto` picks on this machine (see the module doc)."""
    return resolve(requested, device, cpu_flags, cuda_bf16)[0]


def describe(requested: str, device: str, cpu_flags: set[str] | None = None, cuda_bf16: bool | None = None) -> str:
    """One line, e.g. 'dtype auto -> bfloat16 (CPU has avx512_bf16, amx_bf16)'."""
    return precision_record(requested, device, cpu_flags, cuda_bf16)["line"]


def precision_record(requested: str, device: str, cpu_flags: set[str] | None = None,
                     cuda_bf16: bool | None = None, what: str = "dtype") -> dict[str, str]:
    """What a model actor reports: {requested, dtype, why, line}; `what` names the dtype in the line."""
    dtype, why = resolve(requested, device, cpu_flags, cuda_bf16)
    arrow = f"{requested} -> {dtype}" if requested == "auto" else dtype
    return {"requested": requested, "dtype": dtype, "why": why, "line": f"{what} {arrow} ({why})"}


def summarize(records: list[dict]) -> str:
    """The distinct lines of one role's actors, with a count where several actors share one."""
    lines: dict[str, int] = {}
    for record in records:
        lines[record["line"]] = lines.get(record["line"], 0) + 1
    return "; ".join(line if n == 1 else f"{line} x{n}" for line, n in lines.items())


def autocast(compute_dtype: str, device: str | torch.device):
    """The context the learner's forward and loss run in: bf16 autocast (float32 weights stay float32), or
    nothing for float32. Backward runs outside it, as torch recommends."""
    if compute_dtype != "bfloat16":
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(device_type, dtype=torch.bfloat16)


def sync_dtype(engine_records: list[dict]) -> str:
    """The dtype the weights travel to the engines in: bf16 (half the bytes) when every engine runs bf16, else
    float32, which every engine casts losslessly to its own dtype."""
    return "bfloat16" if all(r["dtype"] == "bfloat16" for r in engine_records) else "float32"


def sync_tolerance(*dtypes: str) -> float:
    """Max |log-prob difference| the weight-sync check accepts by default, given the probed engine's and the
    learners' compute dtypes: 1e-3 when all are float32, else 0.5 (bf16 kernels alone differ by ~0.2: only
    gross failures show)."""
    return 1e-3 if all(dtype == "float32" for dtype in dtypes) else 0.5
