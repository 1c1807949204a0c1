"""dtype auto: bf16 where the hardware has it natively, else float32.

The CPU cases fake /proc/cpuinfo: the text below stands in for the file of each kind of machine (trimmed
copies of real `flags` lines), so the test does not depend on the CPU it runs on. The cuda cases fake
torch.cuda.is_bf16_supported() by passing its answer (cuda_bf16) instead.
"""
import pytest
import torch

from pipeline.precision import (autocast, describe, parse_cpu_flags, precision_record, read_cpu_flags, resolve_dtype,
                                summarize, sync_dtype, sync_tolerance)

# Fake /proc/cpuinfo texts (two processors each, as the real file lists every core).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 sha_ni
"""
COOPER_LAKE_AVX512_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8353H
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16
"""
SAPPHIRE_RAPIDS_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = "processor\t: 0\nflags\t\t: avx2 amx_bf16 amx_tile\n"


def test_parse_cpu_flags_reads_the_flags_line():
    flags = parse_cpu_flags(EPYC_AVX2)
    assert "avx2" in flags and "sha_ni" in flags and "avx512_bf16" not in flags
    assert parse_cpu_flags("processor\t: 0\nmodel name\t: x\n") == set()


def test_auto_on_cpus():
    assert resolve_dtype("auto", "cpu", parse_cpu_flags(EPYC_AVX2)) == "float32"
    assert resolve_dtype("auto", "cpu", parse_cpu_flags(COOPER_LAKE_AVX512_BF16)) == "bfloat16"
    assert resolve_dtype("auto", "cpu", parse_cpu_flags(SAPPHIRE_RAPIDS_AMX)) == "bfloat16"
    assert resolve_dtype("auto", "cpu", parse_cpu_flags(AMX_ONLY)) == "bfloat16"
    assert describe("auto", "cpu", parse_cpu_flags(SAPPHIRE_RAPIDS_AMX)) == \
        "dtype auto -> bfloat16 (CPU has avx512_bf16, amx_bf16)"
    assert describe("auto", "cpu", parse_cpu_flags(EPYC_AVX2)) == \
        "dtype auto -> float32 (CPU has no avx512_bf16 or amx_bf16)"


def test_explicit_dtypes_pass_through_and_emulated_bf16_is_named():
    for text in (EPYC_AVX2, SAPPHIRE_RAPIDS_AMX):
        for dtype in ("float32", "bfloat16"):
            assert resolve_dtype(dtype, "cpu", parse_cpu_flags(text)) == dtype
            assert resolve_dtype(dtype, "cuda", cuda_bf16=False) == dtype
    assert "emulated" in describe("bfloat16", "cpu", parse_cpu_flags(EPYC_AVX2))
    assert "emulated" not in describe("bfloat16", "cpu", parse_cpu_flags(COOPER_LAKE_AVX512_BF16))
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", "cpu", set())


def test_auto_on_cuda_ignores_the_cpu():
    epyc = parse_cpu_flags(EPYC_AVX2)
    assert resolve_dtype("auto", "cuda", epyc, cuda_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cuda:0", epyc, cuda_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cuda", epyc, cuda_bf16=False) == "float32"  # a pre-Ampere GPU (V100, T4)
    assert describe("auto", "cuda", epyc, cuda_bf16=True) == "dtype auto -> bfloat16 (GPU has bf16)"
    if not torch.cuda.is_available():  # nothing to check on this node: bf16 is assumed, and the line says so
        assert describe("auto", "cuda", epyc) == "dtype auto -> bfloat16 (cuda; bf16 not checked on this node)"


def test_this_machine_resolves_by_its_own_flags():
    flags = read_cpu_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert read_cpu_flags("/nonexistent/cpuinfo") == set()


def test_records_summary_and_sync_tolerance():
    record = precision_record("auto", "cpu", parse_cpu_flags(EPYC_AVX2), what="compute")
    assert record == {"requested": "auto", "dtype": "float32", "why": "CPU has no avx512_bf16 or amx_bf16",
                      "line": "compute auto -> float32 (CPU has no avx512_bf16 or amx_bf16)"}
    bf16 = precision_record("auto", "cpu", parse_cpu_flags(AMX_ONLY))
    assert summarize([record, record, bf16]) == f"{record['line']} x2; {bf16['line']}"
    assert sync_tolerance("float32", "float32", "float32") == 1e-3
    assert sync_tolerance("float32", "bfloat16") == sync_tolerance("bfloat16", "float32") == 0.5
    assert sync_dtype([bf16, bf16]) == "bfloat16" and sync_dtype([bf16, record]) == "float32"


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 4)
    with autocast("bfloat16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("float32", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
