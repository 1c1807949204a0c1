"""What a benchmark prints about the machine it ran on: the CPU model, its cores and its bf16 support."""
from __future__ import annotations

import os
import platform

from pipeline.precision import read_cpu_flags


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_line() -> str:
    """e.g. 'CPU: AMD EPYC 9B14 (2 cores; avx512_bf16)'."""
    flags = sorted(read_cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores; {', '.join(flags) or 'no avx2'})"
