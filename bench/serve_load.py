"""Load on the reward server over real HTTP: errors, latency, and scored tokens/s vs the in-process packed scorer.

    .venv/bin/python -m bench.serve_load [--requests 1000] [--concurrency 32] [--malformed 0.1] [--dtype auto]

Starts `python -m jobs.serve` (its own process and embedded Ray; one replica with all the cores as torch threads)
and loads it from this process with aiohttp: `--concurrency` requests in flight, each one HH row (prompt +
response) to POST /v1/reward, so the server sees a stream of small requests that only its batching can pack.
Baseline: the packed scorer in this process (score_endogenous, the same rows, dtype and threads), with the server
idle. The rows are split into rounds; each round runs both, in alternating order (ABBA), and the ratio is the
median over rounds. tok/s counts prompt + response tokens of every row on both sides.

With --malformed F, a fraction F of the requests are broken (bad JSON, non-UTF-8, missing or ill-typed fields,
empty responses, too many items, a body over the size limit): each must get its 4xx, every good one its reward.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp
import numpy as np
import torch

from pipeline.chat import encode_row
from pipeline.data import load_hh
from pipeline.endogenous import EndoRewardConfig, score_endogenous
from pipeline.models import context_window, load_causal_lm, load_tokenizer, resolve_model

RAY_WORKER_NICENESS = 15  # Ray's default (ray_config_def.h: worker_niceness)
MALFORMED = [  # (kind, body bytes, expected status)
    ("bad JSON", b'{"items": [{"prompt": "hi", "response": "ok"}', 400),
    ("non-UTF-8", b'{"items": [{"prompt": "\xff", "response": "ok"}]}', 400),
    ("missing response", json.dumps({"items": [{"prompt": "hi"}]}).encode(), 422),
    ("ill-typed prompt", json.dumps({"items": [{"prompt": 5, "response": "ok"}]}).encode(), 422),
    ("empty response", json.dumps({"items": [{"prompt": "hi", "response": " "}]}).encode(), 422),
    ("too many items", json.dumps({"items": [{"prompt": "hi", "response": "ok"}] * 300}).encode(), 413),
    ("body over the limit", json.dumps({"items": [{"prompt": "hi", "response": "x" * (1 << 20)}]}).encode(), 413),
]


def cpu_description() -> tuple[str, bool]:
    info = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return model, "avx512_bf16" in info or "amx_bf16" in info


def hh_rows(path: str, count: int) -> list[dict]:
    """`count` rows: chosen then rejected of consecutive HH pairs (a pair's two rows share their prompt)."""
    pairs, _ = load_hh(path)
    rows = []
    for messages, chosen, rejected in zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()):
        rows += [{"prompt": messages, "response": chosen}, {"prompt": messages, "response": rejected}]
        if len(rows) >= count:
            return rows[:count]
    raise SystemExit(f"{path} holds fewer than {count} rows")


def start_server(port: int, dtype: str, cores: int, log_path: str, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "jobs.serve", "--model.dtype", dtype, "--http.port", str(port), "--ray.address", "local",
            "--ray.dashboard", "false", "--replicas.cpus_per_replica", str(cores), *extra]
    server = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "serving the reward at" not in open(log_path).read():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.5)
    return server


async def load(url: str, bodies: list[tuple[bytes, int]], concurrency: int) -> tuple[list[float], list[str], float]:
    """POST every body with `concurrency` in flight: (latencies of the good ones, errors, wall seconds)."""
    latencies, errors, gate = [], [], asyncio.Semaphore(concurrency)
    connector, timeout = aiohttp.TCPConnector(limit=concurrency), aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(body: bytes, expected: int):
            async with gate:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                        status, text = response.status, await response.text()
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                if status != expected:
                    errors.append(f"HTTP {status} (expected {expected}): {text[:200]}")
                elif expected == 200:
                    if len(json.loads(text)["items"]) != 1:
                        errors.append(f"bad answer: {text[:200]}")
                    latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        await asyncio.gather(*(one(body, expected) for body, expected in bodies))
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="good requests (one row each)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the rows are split into")
    ap.add_argument("--malformed", type=float, default=0.0, help="fraction of extra malformed requests mixed in")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 where the CPU has native bf16 (avx512_bf16/amx_bf16), else float32")
    ap.add_argument("--data", default="../shared/data/hh_harmless_base_test.jsonl")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--no_baseline", action="store_true", help="skip the in-process scorer (for the malformed run)")
    ap.add_argument("--server_args", default="", help="more jobs.serve flags, e.g. '--batching.batch_wait_timeout_s 0.05'")
    args = ap.parse_args()

    # Ray runs its workers, the server's replica among them, at nice 15; this process (the in-process scorer and the
    # load generator) runs at the same priority, so that other work on a shared machine slows both sides alike
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    cpu, native_bf16 = cpu_description()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if native_bf16 else "float32")
    cores = os.cpu_count()
    print(f"CPU: {cpu}, {cores} cores, native bf16: {native_bf16}; model dtype {dtype}", flush=True)
    path = resolve_model("smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(path), load_causal_lm(path, dtype)
    torch.set_num_threads(cores)  # the same threads as the server's replica
    window, reward_cfg = context_window(model.config), EndoRewardConfig()
    rows = hh_rows(args.data, args.requests)
    encoded = [encode_row(tokenizer, row["prompt"], row["response"], window) for row in rows]
    tokens = [len(p) + len(r) for p, r, *_ in encoded]

    def in_process(indices: list[int]) -> float:
        start = time.perf_counter()
        score_endogenous(model, [encoded[i][0] for i in indices], [encoded[i][1] for i in indices],
                         [encoded[i][2] for i in indices], reward_cfg)
        return time.perf_counter() - start

    port = args.port
    if not port:
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    log_path = os.path.join(tempfile.mkdtemp(prefix="serve_load-"), "server.log")
    started = time.perf_counter()
    server = start_server(port, dtype, cores, log_path, args.server_args.split())
    url = f"http://127.0.0.1:{port}/v1/reward"
    print(f"server up in {time.perf_counter() - started:.0f} s (log: {log_path})", flush=True)
    try:
        bodies = [(json.dumps({"items": [row]}).encode(), 200) for row in rows]
        asyncio.run(load(url, bodies[:args.concurrency], args.concurrency))  # warm-up
        if not args.no_baseline:
            in_process(list(range(min(32, len(rows)))))
        rng = np.random.default_rng(0)
        rounds = np.array_split(np.arange(len(rows)), args.rounds)
        served_rates, local_rates, latencies, errors, bad_sent = [], [], [], [], 0
        for k, indices in enumerate(rounds):
            indices = indices.tolist()
            round_bodies = [bodies[i] for i in indices]
            if args.malformed:
                bad = [MALFORMED[j % len(MALFORMED)] for j in range(int(round(args.malformed * len(indices))))]
                bad_sent += len(bad)
                for _, body, status in bad:
                    round_bodies.insert(int(rng.integers(0, len(round_bodies) + 1)), (body, status))
            round_tokens = sum(tokens[i] for i in indices)
            for step in ((0, 1) if k % 2 == 0 else (1, 0)):  # ABBA: load drift hits both sides alike
                if step == 0:
                    got, errs, seconds = asyncio.run(load(url, round_bodies, args.concurrency))
                    latencies += got
                    errors += errs
                    served_rates.append(round_tokens / seconds)
                elif not args.no_baseline:
                    local_rates.append(round_tokens / in_process(indices))
            print(f"round {k + 1}/{len(rounds)}: {len(indices)} rows, {round_tokens} tokens: served "
                  f"{served_rates[-1]:.0f} tok/s" + (f", in-process {local_rates[-1]:.0f} tok/s" if local_rates else ""),
                  flush=True)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    local_rates = local_rates or [float("nan")] * len(served_rates)
    ratios = [s / l for s, l in zip(served_rates, local_rates)]
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    print(f"\n{len(rows)} good requests (+ {bad_sent} malformed), concurrency {args.concurrency}, {sum(tokens)} tokens, "
          f"{dtype}, {cores} threads")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    print(f"latency of the good requests: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"served     {np.median(served_rates):.0f} tok/s (median of rounds)")
    if not args.no_baseline:
        print(f"in-process {np.median(local_rates):.0f} tok/s (median of rounds)")
        print(f"served / in-process = {np.median(ratios):.2f}x (median of per-round ratios "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.8x)")
    print(json.dumps({"cpu": cpu, "dtype": dtype, "requests": len(rows), "malformed": bad_sent, "errors": len(errors),
                      "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "served_tok_s": float(np.median(served_rates)),
                      "in_process_tok_s": float(np.median(local_rates)), "ratio": float(np.median(ratios))}))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
