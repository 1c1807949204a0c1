#!/usr/bin/env bash
# Run a command as if this CPU had AVX2 but no AVX-512/bf16 (an AMD EPYC before Zen 4), to time it there:
#
#     bench/as_avx2.sh make test
#
# What it changes, in a private mount namespace (needs root or user namespaces, as tests/multinode.py does):
#   - /proc/cpuinfo without the avx512* and amx* flags, so `dtype: auto` resolves to float32 (pipeline/precision.py);
#   - ATEN_CPU_CAPABILITY=avx2: torch's own CPU kernels dispatch to their AVX2 builds;
#   - ONEDNN_MAX_CPU_ISA=AVX2: oneDNN (torch's matmuls and linear layers) uses no AVX-512 or AMX.
# What it cannot change: vLLM picks its compiled CPU kernels by CPUID (torch.cpu._is_avx512_supported), so the
# engine's attention and cache kernels stay AVX-512; and core clocks and memory bandwidth stay this machine's.
# A time measured under it is an estimate for an AVX2-only machine, not a measurement on one.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
fake=$(mktemp /tmp/cpuinfo_avx2.XXXXXX)
trap 'rm -f "$fake"' EXIT
sed -E '/^flags/ s/ (avx512[a-z0-9_]*|amx[a-z0-9_]*)//g' /proc/cpuinfo > "$fake"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
unshare --mount --propagation private sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$fake" "$@"
