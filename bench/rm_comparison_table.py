"""The table of bench/rm_comparison.sh: pairwise accuracy (%) of the three trained RM kinds, of the endogenous
reward and of the length baseline "shorter response wins", per evaluation set, as the mean and sample standard
deviation over the seeds; then the HH held-out accuracy per seed, with the sentence-minus-response difference
the paper reports (+2.7 points).

    python bench/rm_comparison_table.py OUT MODEL FREEZE MAX_LENGTH LR DTYPE SEED [SEED ...]

Reads OUT/seed<S>/<kind>/results.json (jobs.train_rm), OUT/seed<S>/endogenous/results.json (jobs.eval_rewards on
that seed's held-out pairs) and OUT/endogenous_llmbar/results.json; writes OUT/comparison.md and prints it.
"""
import json
import statistics
import sys

KINDS = ("sentence", "response", "token")
LLMBAR = ["Natural", "Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut", "Adversarial_Manual"]
POOLED = "LLMBar (all 5)"
COLUMNS = ["heldout"] + LLMBAR + [POOLED]
ENDOGENOUS = "endogenous reward (sum, no training)"
SHORTER = "shorter response wins (reference: no model)"


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def with_pooled(accuracy: dict, counts: dict) -> dict:
    """Adds the pair-weighted LLMBar accuracy: sum_s acc_s * n_s / sum_s n_s over the five sets."""
    pooled = sum(accuracy[s] * counts[s] for s in LLMBAR) / sum(counts[s] for s in LLMBAR)
    return {**accuracy, POOLED: pooled}


def seed_rows(out: str, seed: str) -> tuple[dict, dict, int]:
    """{row name: {column: accuracy}}, {column: pairs} and the trained-pair count of one seed."""
    rows, counts = {}, None
    for kind in KINDS:
        result = load(f"{out}/seed{seed}/{kind}/results.json")
        if counts is not None and result["counts"] != counts:
            raise ValueError(f"seed {seed}: the {kind} RM was evaluated on other pairs: {result['counts']} vs {counts}")
        counts, trained = result["counts"], result["trained_pairs"]
        rows[f"{kind}-level RM"] = with_pooled(result["accuracy"][f"{kind} RM"], counts)
    heldout = load(f"{out}/seed{seed}/endogenous/results.json")
    llmbar = load(f"{out}/endogenous_llmbar/results.json")
    endogenous_counts = {**llmbar["counts"], **heldout["counts"]}
    if any(endogenous_counts[c] != counts[c] for c in COLUMNS[:-1]):
        raise ValueError(f"seed {seed}: the endogenous reward was evaluated on other pairs: {endogenous_counts} vs {counts}")
    for name, source in ((ENDOGENOUS, "endogenous (sum)"), (SHORTER, "shorter wins")):
        accuracy = {**llmbar["accuracy"][source], **heldout["accuracy"][source]}
        rows[name] = with_pooled(accuracy, counts)
    return rows, {**counts, POOLED: sum(counts[s] for s in LLMBAR)}, trained


def cell(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    out, model, freeze, max_length, lr, dtype, *seeds = sys.argv[1:]
    per_seed = {seed: seed_rows(out, seed) for seed in seeds}
    names = list(per_seed[seeds[0]][0])
    heldout_n = sorted({counts["heldout"] for _, counts, _ in per_seed.values()})
    trained = sorted({t for _, _, t in per_seed.values()})
    counts = per_seed[seeds[0]][1]
    spread = "mean ± sample sd over" if len(seeds) > 1 else "seed"
    lines = [f"Pairwise accuracy (%), {spread} seed(s) {', '.join(seeds)}; backbone `{model}` in {dtype}. "
             f"Trained RMs: {'/'.join(map(str, trained))} HH-harmless pairs, 1 epoch, lr {lr}, embeddings + lowest "
             f"{freeze} layers frozen, sides cut to {max_length} tokens; the endogenous reward sees the same "
             f"{max_length}-token window. heldout = the HH pairs no RM trained on (the seed picks them: "
             f"n = {'/'.join(map(str, heldout_n))}).", "",
             "| reward | " + " | ".join(c if c == "heldout" else f"{c} (n={counts[c]})" for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell([per_seed[s][0][name][c] for s in seeds]) for c in COLUMNS) + " |")
    lines += ["", "HH held-out accuracy (%) per seed:", "",
              "| seed | " + " | ".join(names) + " | sentence - response (points) |", "|---|" + "---|" * (len(names) + 1)]
    for seed in seeds:
        rows = per_seed[seed][0]
        gap = 100 * (rows["sentence-level RM"]["heldout"] - rows["response-level RM"]["heldout"])
        lines.append(f"| {seed} | " + " | ".join(f"{100 * rows[n]['heldout']:.1f}" for n in names) + f" | {gap:+.1f} |")
    table = "\n".join(lines)
    with open(f"{out}/comparison.md", "w") as fh:
        fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
