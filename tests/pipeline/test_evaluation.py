import numpy as np

from pipeline.evaluation import accuracy_table, markdown_table, pairwise_wins


def test_pairwise_wins_counts_ties_as_half():
    assert pairwise_wins(np.array([2.0, 1.0, 1.0]), np.array([1.0, 2.0, 1.0])).tolist() == [1.0, 0.0, 0.5]


def test_accuracy_per_subset_and_overall():
    subsets = np.array(["a", "a", "b"])
    table = accuracy_table(subsets, {"s": (np.array([1.0, 0.0, 5.0]), np.array([0.0, 1.0, 1.0]))})
    assert table == {"s": {"a": 0.5, "b": 1.0, "overall": 2 / 3}}
    text = markdown_table(table, {"a": 2, "b": 1})
    assert "| s | 50.0 | 100.0 | 66.7 |" in text and "a (n=2)" in text and "overall (n=3)" in text
