"""jobs.score end to end on the tiny model: columns, order, formats and every bad-input error."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score
from pipeline.models import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"id": 7, "prompt": "What is 2+2?", "response": "4."},
        {"id": 3, "prompt": [{"role": "user", "content": "Name a fruit."}], "response": "An apple."},
        {"id": 5, "prompt": "Say hi.", "response": "Hi! Nice to meet you."}]


def run(tiny_model_dir, *args):
    return score.main(["--model", tiny_model_dir, "--scoring.batch_size", "2", "--ray.num_cpus", "2", *args])


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_scores_keep_every_column_and_row_order(tmp_path, tiny_model_dir, local_ray, suffix):
    out = tmp_path / f"out.{suffix}"
    run(tiny_model_dir, "--input", write_jsonl(tmp_path / "in.jsonl", ROWS), "--output", str(out))
    rows = pq.read_table(out).to_pylist() if suffix == "parquet" else [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 3, 5] and [r["response"] for r in rows] == [r["response"] for r in ROWS]
    for r in rows:
        assert abs(sum(r["token_rewards"]) - r["reward"]) < 1e-3 and r["prompt_tokens_dropped"] == 0
    tokenizer = load_tokenizer(tiny_model_dir)
    assert [len(r["token_rewards"]) for r in rows] == [len(tokenizer(r["response"])["input_ids"]) + 1 for r in ROWS]  # + EOS
    assert not (tmp_path / f"out.{suffix}.partial").exists()


def test_parquet_input(tmp_path, tiny_model_dir, local_ray):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], ROWS[2]]), src)
    run(tiny_model_dir, "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_long_prompt_is_truncated_and_counted(tmp_path, tiny_model_dir, local_ray):
    rows = [{"prompt": "word " * 300, "response": "ok"}]
    run(tiny_model_dir, "--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", str(tmp_path / "o.jsonl"),
        "--base.max_length", "64")
    out = json.loads((tmp_path / "o.jsonl").read_text())
    assert out["prompt_tokens_dropped"] > 200
    with pytest.raises(SystemExit, match="row 0.*window of 64 tokens"):
        run(tiny_model_dir, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o2.jsonl"),
            "--base.max_length", "64", "--reward.truncation", "error")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "hi"}], "no `response` column"),
    ([{"response": "hi"}], "no `prompt` column"),
    ([{"prompt": "hi", "response": "ok"}, {"prompt": "  ", "response": "ok"}], "row 1: field `prompt` is empty"),
    ([{"prompt": "hi", "response": ""}], "row 0: field `response` is empty"),
])
def test_bad_rows_are_refused_before_any_work(tmp_path, tiny_model_dir, rows, message):
    out = tmp_path / "o.jsonl"
    out.write_text("earlier results\n")
    with pytest.raises(SystemExit, match=message):
        run(tiny_model_dir, "--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", str(out))
    assert out.read_text() == "earlier results\n"  # nothing already there is lost


def test_unreadable_input_and_unknown_model(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="no such data file"):
        run(tiny_model_dir, "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(SystemExit, match="bad JSON on line 2"):
        run(tiny_model_dir, "--input", str(bad), "--output", str(tmp_path / "o.jsonl"))
    good = write_jsonl(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(SystemExit, match="--model: model path .* does not exist"):
        score.main(["--model", str(tmp_path / "no_model"), "--input", good, "--output", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit, match="unknown file type"):
        run(tiny_model_dir, "--input", good, "--output", str(tmp_path / "o.csv"))


def test_a_response_cut_to_the_window_is_scored_as_unfinished(tmp_path, tiny_model_dir, local_ray):
    # regression: every row was scored as finished, so a response cut at the right (no EOS any more) still got
    # V(s_{H+1}) := 0 whatever --reward.truncated_terminal said
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Count.", "response": "one two " * 60},
                                                 {"prompt": "Say hi.", "response": "Hello."}])
    out = {}
    for terminal in ("zero", "value"):
        run(tiny_model_dir, "--input", source, "--output", str(tmp_path / f"{terminal}.jsonl"), "--base.max_length", "64",
            "--reward.truncated_terminal", terminal)
        out[terminal] = [json.loads(line)["token_rewards"] for line in (tmp_path / f"{terminal}.jsonl").read_text().splitlines()]
    cut_zero, cut_value = out["zero"][0], out["value"][0]
    assert cut_zero[:-1] == pytest.approx(cut_value[:-1]) and cut_zero[-1] != pytest.approx(cut_value[-1])
    assert out["zero"][1] == pytest.approx(out["value"][1])  # a finished response ends with V := 0 either way
