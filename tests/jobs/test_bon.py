"""jobs.bon end to end on the tiny model (vLLM + scorers through Ray), and its refusals before any actor starts."""
import json

import numpy as np
import pytest

from jobs import bon

PROMPTS = ["Name a fruit.", "Say hi."]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def run(tiny_model_dir, tmp_path, *args):
    out = tmp_path / f"bon_{len(list(tmp_path.iterdir()))}.jsonl"
    bon.main(["--model.name", tiny_model_dir, "--prompts", prompts_file(tmp_path), "--n", "3", "--output", str(out),
              "--rollout_dtype", "float32", "--rollout.max_new_tokens", "12", "--rollout.max_prompt_tokens", "128",
              "--ray.vllm_cpu_kvcache_gib", "1", *args])
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_best_of_n_keeps_the_top_candidate(tmp_path, tiny_model_dir, tiny_sentence_rm_dir, local_ray):
    runs = {"endogenous": run(tiny_model_dir, tmp_path, "--reward", "endogenous"),
            "sentence_rm": run(tiny_model_dir, tmp_path, "--reward", "sentence_rm", "--rm_path", tiny_sentence_rm_dir)}
    for source, rows in runs.items():
        assert [r["prompt"][0]["content"] for r in rows] == PROMPTS and len({r["prompt_id"] for r in rows}) == 2
        for r in rows:
            assert len(r["candidates"]) == len(r["scores"]) == len(r["candidates_finished"]) == 3
            assert r["scores"] == r[f"{source}_scores"]
            assert r["score"] == max(r["scores"]) and r["best_index"] == int(np.argmax(r["scores"]))
            assert r["response"] == r["candidates"][r["best_index"]]
    # samples are seeded per prompt: both sources scored the same candidates
    assert [r["candidates"] for r in runs["endogenous"]] == [r["candidates"] for r in runs["sentence_rm"]]


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--reward", "sentence_rm"], "--reward sentence_rm needs --rm_path"),
    (["--reward", "both"], "--reward both needs --rm_path"),
    (["--reward", "sentence_rm", "--rm_path", "/nonexistent/rm"], "no trained reward model there"),
    (["--reward", "bogus"], "not one of"),
    (["--output", "out.csv"], "unknown file type"),
    (["--model.device", "cuda"], "no CUDA GPU"),
])
def test_bad_inputs_are_refused_before_any_actor(tmp_path, tiny_model_dir, monkeypatch, args, message):
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(bon, "init_ray", lambda *a, **k: pytest.fail("an actor was about to start"))
    with pytest.raises(SystemExit, match=message):
        bon.main(["--model.name", tiny_model_dir, "--prompts", prompts_file(tmp_path), *args])


def test_no_prompts_and_baseline_rm_are_refused(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(bon, "init_ray", lambda *a, **k: pytest.fail("an actor was about to start"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="--prompts"):
        bon.main(["--model.name", tiny_model_dir, "--prompts", str(empty)])
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_model.yaml").write_text("kind: response\n")
    with pytest.raises(SystemExit, match="'response' reward model"):
        bon.main(["--model.name", tiny_model_dir, "--reward", "sentence_rm", "--rm_path", str(tmp_path / "rm")])


def test_help_lists_the_config_tree(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bon.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--n int", "--reward {endogenous,sentence_rm,both}", "--rm_path", "--rollout.max_new_tokens",
                 "--endogenous.system_prompt", "--sentence_rm_weight"):
        assert flag in text


def test_both_sources_pick_by_the_weighted_sum(tiny_model_dir):
    import pyarrow as pa

    from pipeline.arrow import numpy_to_ragged
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["a", "b", "c", "d", "e", "f"]
    rollout = pa.table({"prompt_id": ["p0"] * 3 + ["p1"] * 3,
                        "response_ids": numpy_to_ragged([tokenizer(t)["input_ids"] for t in texts], pa.int32()),
                        "finished": [True, False, True, True, True, True]})
    scores = {"endogenous": np.array([1.0, 3.0, 0.0, 2.0, 2.0, 0.0]),
              "sentence_rm": np.array([4.0, 0.0, 1.0, 0.0, 0.0, 0.0])}
    messages = [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}]]
    rows = bon.best_rows(rollout, scores, {"endogenous": 1.0, "sentence_rm": 0.5}, 3, messages, tokenizer)
    assert [r["best_index"] for r in rows] == [0, 0]  # 1 + 2 > 3 + 0; a tie goes to the first candidate
    assert rows[0]["scores"] == [3.0, 3.0, 0.5] and rows[0]["score"] == 3.0 and rows[0]["response"] == "a"
    assert rows[0]["candidates"] == ["a", "b", "c"] and rows[0]["candidates_finished"] == [True, False, True]
    assert rows[1]["prompt_id"] == "p1" and rows[1]["prompt"] == messages[1] and rows[1]["response"] == "d"
    assert rows[0]["endogenous_scores"] == [1.0, 3.0, 0.0] and rows[0]["sentence_rm_scores"] == [4.0, 0.0, 1.0]
