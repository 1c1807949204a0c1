"""RL with the raw endogenous reward vs a length-robust form: same config and seed, judged independently.

    .venv/bin/python -m bench.forms_rl --robust "--reward.form centered"
    .venv/bin/python -m bench.forms_rl --robust "..." --skip_runs     # only judge and plot finished runs

Runs jobs.rlhf (configs/local.yaml) once per arm into runs/forms_<arm>/, then judges the held-out samples each
run saved at every evaluation (heldout/step_N.parquet: the same prompts and sampling seed every time):
  - own reward and response length, from the runs' metrics;
  - cross reward: every arm's samples scored with the other arm's reward (jobs.score, one call per form);
  - LLM-as-a-judge, both orders (pipeline/judge.py, the same frozen model): each evaluation's sample against the
    step-0 sample of the same prompt and sample index; win rate = share of positive averaged margins.
Writes bench/forms_rl.png (the four curves side by side) and prints the table of the last evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq

from pipeline.data import builtin_prompts, split_prompts
from pipeline.judge import answer_token_ids, judge_margins, judge_prompt_ids
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model


def run_arm(storage: str, flags: list[str], steps: int) -> None:
    cmd = [sys.executable, "-m", "jobs.rlhf", "--config", "configs/local.yaml", "--storage", storage,
           "--steps", str(steps), *flags]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def heldout_samples(storage: str) -> dict[int, list[dict]]:
    """step -> held-out rows (prompt_id, response_ids, sample index within its prompt, reward)."""
    out = {}
    for name in sorted(os.listdir(os.path.join(storage, "heldout"))):
        rows = pq.read_table(os.path.join(storage, "heldout", name)).to_pylist()
        seen: dict[str, int] = {}
        for row in rows:
            row["sample"] = seen[row["prompt_id"]] = seen.get(row["prompt_id"], -1) + 1
        out[int(name.removeprefix("step_").removesuffix(".parquet"))] = rows
    return out


def cross_rewards(rows: list[dict], flags: list[str], work: str, name: str) -> list[float]:
    """The reward of `flags` for every row, by jobs.score (the same scorer users run)."""
    source, scored = os.path.join(work, f"{name}.jsonl"), os.path.join(work, f"{name}.scored.jsonl")
    with open(source, "w") as fh:
        for row in rows:
            fh.write(json.dumps({"prompt": row["messages"], "response": row["text"]}) + "\n")
    subprocess.run([sys.executable, "-m", "jobs.score", "--ray.address", "local", "--input", source, "--output", scored, *flags],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return [json.loads(line)["reward"] for line in open(scored)]


def judge_win_rates(model, tokenizer, rows_by_step: dict[int, list[dict]]) -> dict[int, float]:
    """Share of held-out samples the judge prefers over the step-0 sample of the same prompt and index."""
    a_id, b_id = answer_token_ids(tokenizer)
    baseline = {(r["prompt_id"], r["sample"]): r for r in rows_by_step[0]}
    rates = {}
    for step, rows in rows_by_step.items():
        prompts = []
        for row in rows:
            before = baseline[(row["prompt_id"], row["sample"])]
            prompts.append(judge_prompt_ids(tokenizer, row["messages"], row["text"], before["text"]))  # new as A
            prompts.append(judge_prompt_ids(tokenizer, row["messages"], before["text"], row["text"]))  # new as B
        margins = judge_margins(model, prompts, a_id, b_id)
        # both orders: m = (margin(new as A) - margin(new as B)) / 2 > 0 means the judge prefers the new sample
        both = (margins[0::2] - margins[1::2]) / 2
        rates[step] = float(np.mean(both > 0)) if step else 0.5
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", default="--reward.form raw --reward.normalize none", help="flags of the raw arm")
    ap.add_argument("--robust", required=True, help="flags of the length-robust arm")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip_runs", action="store_true")
    ap.add_argument("--plot", default="bench/forms_rl.png")
    args = ap.parse_args()
    arms = {"raw": shlex.split(args.raw), "robust": shlex.split(args.robust)}
    storages = {arm: f"runs/forms_{arm}" for arm in arms}
    if not args.skip_runs:
        for arm, flags in arms.items():
            run_arm(storages[arm], flags, args.steps)

    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_dir)
    _, heldout = split_prompts(builtin_prompts(), 0.125, 0)  # jobs.rlhf's default split (seed 0)
    messages = dict(zip(heldout["prompt_id"].to_pylist(), heldout["prompt"].to_pylist()))
    samples = {arm: heldout_samples(storages[arm]) for arm in arms}
    flat = []
    for arm, by_step in samples.items():
        for step, rows in by_step.items():
            for row in rows:
                row.update(arm=arm, step=step, messages=messages[row["prompt_id"]],
                           text=tokenizer.decode(row["response_ids"], skip_special_tokens=True))
                flat.append(row)
    work = "runs/forms_judge"
    os.makedirs(work, exist_ok=True)
    for judge_arm, flags in arms.items():
        for row, reward in zip(flat, cross_rewards(flat, flags, work, judge_arm)):
            row[f"reward_by_{judge_arm}"] = reward
    model = load_causal_lm(model_dir, "float32")
    wins = {arm: judge_win_rates(model, tokenizer, samples[arm]) for arm in arms}

    curves = {}
    for arm in arms:
        steps = sorted(samples[arm])
        rows = lambda s: [r for r in flat if r["arm"] == arm and r["step"] == s]  # noqa: E731
        curves[arm] = {
            "step": steps,
            "own reward": [float(np.mean([r["reward"] for r in rows(s)])) for s in steps],
            "response length": [float(np.mean([len(r["response_ids"]) for r in rows(s)])) for s in steps],
            **{f"reward by {j}": [float(np.mean([r[f"reward_by_{j}"] for r in rows(s)])) for s in steps] for j in arms},
            "judge win rate vs step 0": [wins[arm][s] for s in steps],
        }
    json.dump(curves, open(os.path.join(work, "curves.json"), "w"), indent=1)
    plot(curves, args.plot)
    names = [k for k in curves["raw"] if k != "step"]
    print("| arm | " + " | ".join(f"{n} (step 0 -> {curves['raw']['step'][-1]})" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for arm, c in curves.items():
        print(f"| {arm}: {args.raw if arm == 'raw' else args.robust} | "
              + " | ".join(f"{c[n][0]:.3g} -> {c[n][-1]:.3g}" for n in names) + " |")


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in curves["raw"] if k != "step" and k != "own reward"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(axes, names):
        for arm, c in curves.items():
            ax.plot(c["step"], c[name], marker="o", label=arm)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("RL step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
