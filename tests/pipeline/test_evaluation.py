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


def test_length_controlled_accuracy_splits_by_which_answer_is_longer():
    subsets = np.array(["a"] * 5)
    chosen_len, rejected_len = np.array([10, 10, 3, 3, 5]), np.array([5, 5, 8, 8, 5])  # last pair: equal lengths
    scores = {"longer wins": (chosen_len, rejected_len), "r": (np.array([1, 0, 1, 1, 0]), np.array([0, 1, 0, 0, 1]))}
    table = accuracy_table(subsets, scores, lengths=(chosen_len, rejected_len))
    assert table["longer wins"]["chosen longer"] == 1.0 and table["longer wins"]["chosen shorter"] == 0.0
    assert table["longer wins"]["length-controlled"] == 0.5
    assert table["r"]["chosen longer"] == 0.5 and table["r"]["chosen shorter"] == 1.0
    assert table["r"]["length-controlled"] == 0.75 and table["r"]["overall"] == 0.6
    text = markdown_table(table, {"a": 5})
    assert "| r | 60.0 | 60.0 | 50.0 | 100.0 | 75.0 |" in text and "| length-controlled |" in text


def test_length_controlled_without_shorter_pairs_is_nan():
    row = accuracy_table(np.array(["a"]), {"s": (np.array([1.0]), np.array([0.0]))},
                         lengths=(np.array([4]), np.array([2])))["s"]
    assert row["chosen longer"] == 1.0 and np.isnan(row["chosen shorter"]) and np.isnan(row["length-controlled"])
