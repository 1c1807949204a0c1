"""Pairwise preference accuracy of reward sources, per subset and overall, and its report tables."""
from __future__ import annotations

import numpy as np


def pairwise_wins(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 when the chosen response scores higher, 0 when lower, 0.5 on a tie."""
    return np.where(chosen > rejected, 1.0, np.where(chosen < rejected, 0.0, 0.5))


LENGTH_COLUMNS = ("chosen longer", "chosen shorter", "length-controlled")


def length_controlled(wins: np.ndarray, chosen_len: np.ndarray, rejected_len: np.ndarray) -> dict[str, float]:
    """Accuracy on pairs whose chosen answer is longer, on those where it is shorter (equal lengths: in neither),
    and their mean: a length-only reward scores 100 and 0 there, so 50 on the mean."""
    longer, shorter = chosen_len > rejected_len, chosen_len < rejected_len
    acc_longer = float(wins[longer].mean()) if longer.any() else float("nan")
    acc_shorter = float(wins[shorter].mean()) if shorter.any() else float("nan")
    return {"chosen longer": acc_longer, "chosen shorter": acc_shorter,
            "length-controlled": (acc_longer + acc_shorter) / 2}  # LC = (acc | chosen longer + acc | chosen shorter) / 2


def accuracy_table(subsets: np.ndarray, scores: dict[str, tuple[np.ndarray, np.ndarray]],
                   lengths: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """{source: {subset: accuracy, ..., "overall": accuracy over all pairs}}, plus the LENGTH_COLUMNS when
    `lengths` (chosen, rejected response lengths) is given."""
    table = {}
    names = sorted(set(subsets.tolist()))
    for source, (chosen, rejected) in scores.items():
        wins = pairwise_wins(np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64))
        row = {name: float(wins[subsets == name].mean()) for name in names}
        row["overall"] = float(wins.mean()) if len(wins) else float("nan")
        if lengths is not None:
            row.update(length_controlled(wins, np.asarray(lengths[0]), np.asarray(lengths[1])))
        table[source] = row
    return table


def markdown_table(table: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    first = next(iter(table.values()))
    subsets = [s for s in first if s != "overall" and s not in LENGTH_COLUMNS]
    columns = subsets + ["overall"] + [c for c in LENGTH_COLUMNS if c in first]
    header = "| source | " + " | ".join(f"{c} (n={counts[c]})" if c in counts else
                                        (f"{c} (n={sum(counts.values())})" if c == "overall" else c)
                                        for c in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for source, row in table.items():
        lines.append(f"| {source} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)
