"""jobs.eval_rewards end to end on the tiny model with a hand-made pairs file."""
import json

import numpy as np
import pytest

from jobs import eval_rewards

PAIRS = [  # the chosen response is always the longer one, so "longer wins" must score 100%
    {"prompt": "Name a colour.", "chosen": "Blue is a calm colour.", "rejected": "Blue.", "subset": "a"},
    {"prompt": "Say hello.", "chosen": "Hello there, friend!", "rejected": "Hi.", "subset": "a"},
    {"prompt": [{"role": "user", "content": "Count to three."}], "chosen": "One, two, three.", "rejected": "1", "subset": "b"},
]


def test_writes_table_json_and_markdown(tmp_path, tiny_model_dir, local_ray, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    report = eval_rewards.main(["--data", str(data), "--model.name", tiny_model_dir, "--output", str(tmp_path / "out"),
                                "--scoring.batch_size", "2", "--forms", "sum,mean,centered,pmi"])
    acc = report["accuracy"]
    assert set(acc) == {"endogenous (sum)", "endogenous (per-token mean)", "endogenous (centered)", "endogenous (pmi)",
                        "longer wins", "shorter wins", "LLM-as-a-judge (both orders)"}
    assert acc["longer wins"]["overall"] == 1.0 and acc["longer wins"]["chosen longer"] == 1.0
    assert acc["shorter wins"]["overall"] == 0.0
    assert all(np.isnan(row["chosen shorter"]) for row in acc.values())  # every chosen answer is the longer one
    assert all(0.0 <= v <= 1.0 for row in acc.values() for v in row.values() if not np.isnan(v))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert json.dumps(saved["accuracy"]) == json.dumps(acc) and saved["counts"] == {"a": 2, "b": 1}
    assert "| longer wins | 100.0 | 100.0 | 100.0 | 100.0 | nan | nan |" in (tmp_path / "out" / "results.md").read_text()
    assert "longer wins" in capsys.readouterr().out


def test_missing_data_and_bad_format_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="--data is required"):
        eval_rewards.main([])
    with pytest.raises(SystemExit, match="not one of"):
        eval_rewards.main(["--data", "x.jsonl", "--format", "csv"])
    with pytest.raises(SystemExit, match="--forms 'sum,median'"):
        eval_rewards.main(["--data", "x.jsonl", "--forms", "sum,median"])
    with pytest.raises(SystemExit, match="--forms: reward.anti_principle is empty"):
        eval_rewards.main(["--data", "x.jsonl", "--forms", "sum,contrastive", "--reward.anti_principle", ""])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        eval_rewards.main(["--data", str(tmp_path / "missing.jsonl"), "--judge", "false"])
