"""Pairwise preference accuracy of reward sources, per subset and overall, and its report tables."""
from __future__ import annotations

import numpy as np


def pairwise_wins(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 when the chosen response scores higher, 0 when lower, 0.5 on a tie."""
    return np.where(chosen > rejected, 1.0, np.where(chosen < rejected, 0.0, 0.5))


def accuracy_table(subsets: np.ndarray, scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    """{source: {subset: accuracy, ..., "overall": accuracy over all pairs, "n:<subset>": count}}."""
    table = {}
    names = sorted(set(subsets.tolist()))
    for source, (chosen, rejected) in scores.items():
        wins = pairwise_wins(np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64))
        row = {name: float(wins[subsets == name].mean()) for name in names}
        row["overall"] = float(wins.mean()) if len(wins) else float("nan")
        table[source] = row
    return table


def markdown_table(table: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    subsets = [s for s in next(iter(table.values())) if s != "overall"]
    columns = subsets + ["overall"]
    header = "| source | " + " | ".join(f"{c} (n={counts.get(c, sum(counts.values()))})" for c in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for source, row in table.items():
        lines.append(f"| {source} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)
