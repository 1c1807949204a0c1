"""jobs.train_rm end to end on the tiny model: 2 Ray Train workers, DeepSpeed ZeRO-2 on CPU (gloo), resume,
the final model, storage on object storage, and the refusals that must come before any worker starts."""
import json

import pytest
import torch

from jobs import train_rm
from pipeline.data import load_preference_data
from pipeline.rm_training import encode_pairs, evaluate_pairs
from pipeline.sentence_rm import load_reward_model
from pipeline.storage import Storage

TOPICS = ["the sea", "a cat", "rain", "bread", "the moon", "a bicycle", "winter", "tea"]


def write_pairs(path, n: int, subset: str) -> str:
    """n pairs where the chosen answer is helpful and polite and the rejected one is curt."""
    rows = [{"prompt": f"Tell me something about {TOPICS[i % len(TOPICS)]} ({i}).",
             "chosen": f"Sure! Here is a fact about {TOPICS[i % len(TOPICS)]}. I hope it helps you today.",
             "rejected": "No.", "subset": subset} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def args(tmp_path, tiny_model_dir, kind="sentence", *extra) -> list[str]:
    return ["--data", write_pairs(tmp_path / "pairs.jsonl", 16, "toy"), "--model.name", tiny_model_dir,
            "--storage", str(tmp_path / f"out_{kind}"), "--rm.kind", kind, "--rm.attn_dim", "16",
            "--train.workers", "2", "--train.zero_stage", "2", "--train.batch_size", "2", "--train.lr", "1e-4",
            "--heldout_fraction", "0.25", "--train.max_length", "128", *extra]


@pytest.mark.slow
def test_sentence_rm_trains_resumes_and_saves_a_loadable_model(tmp_path, tiny_model_dir, local_ray):
    eval_file = write_pairs(tmp_path / "extra.jsonl", 3, "extra")
    base = args(tmp_path, tiny_model_dir, "sentence", "--eval_data", eval_file)
    out = tmp_path / "out_sentence"

    first = train_rm.main(base + ["--train.epochs", "1"])
    assert first["epochs"] == 1 and first["steps"] == 3  # 12 train pairs / 2 workers / 2 per batch
    assert first["counts"] == {"extra": 3, "heldout": 4} and first["trained_pairs"] == 12
    assert (out / "checkpoints" / "epoch_001" / "reward_model" / "reward_model.yaml").exists()

    # a second run into the same folder must say --resume; resuming continues at epoch 2, step 4
    with pytest.raises(SystemExit, match="--resume to continue"):
        train_rm.main(base + ["--train.epochs", "2"])
    second = train_rm.main(base + ["--train.epochs", "2", "--resume"])
    assert second["epochs"] == 2 and second["steps"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]  # epoch 1's log kept
    assert (out / "checkpoints" / "epoch_002" / "deepspeed" / "latest").exists()
    assert any((out / "tensorboard").iterdir())
    with pytest.raises(SystemExit, match="nothing to do"):
        train_rm.main(base + ["--train.epochs", "2", "--resume"])

    # the final model loads on its own, tokenizer included, and scores the held-out pairs as the job did
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == second["accuracy"] and "| sentence RM |" in (out / "results.md").read_text()
    cut = saved["truncated_sides"]
    assert f"were cut: {cut['train']} training, {cut['eval']} evaluation." in (out / "results.md").read_text()
    model, tokenizer, config = load_reward_model(str(out / "final"))
    assert config.kind == "sentence"
    heldout, _ = load_preference_data(str(out / "heldout_pairs.jsonl"))
    encoded = encode_pairs(heldout, tokenizer, "sentence", tokenizer.convert_tokens_to_ids("<END>"), max_length=128)
    accuracy = evaluate_pairs(model, encoded, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert accuracy["heldout"] == pytest.approx(second["accuracy"]["sentence RM"]["heldout"])


@pytest.mark.slow
def test_response_rm_quick_run(tmp_path, tiny_model_dir, local_ray):
    report = train_rm.main(args(tmp_path, tiny_model_dir, "response", "--max_pairs", "4"))
    assert report["kind"] == "response" and report["trained_pairs"] == 4 and report["steps"] == 1
    assert set(report["accuracy"]["response RM"]) == {"heldout", "overall"}
    model, _, config = load_reward_model(str(tmp_path / "out_response" / "final"))
    assert config.kind == "response" and type(model).__name__ == "ResponseRewardModel"


@pytest.mark.slow
def test_bad_inputs_fail_before_any_worker(tmp_path, tiny_model_dir, local_ray):
    with pytest.raises(SystemExit, match="not one of"):
        train_rm.main(args(tmp_path, tiny_model_dir, "paragraph"))
    cfg = train_rm.RMTrainConfig(data="x.jsonl")
    cfg.rm.kind = "paragraph"  # built in code, not parsed: check_config still names the field
    with pytest.raises(SystemExit, match="--rm.kind 'paragraph' is unknown"):
        train_rm.check_config(cfg)
    with pytest.raises(SystemExit, match="--train.zero_stage must be 0, 1, 2 or 3"):
        train_rm.main(args(tmp_path, tiny_model_dir, "sentence", "--train.zero_stage", "4"))
    with pytest.raises(SystemExit, match="--data is required"):
        train_rm.main([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="--data: .*no rows"):
        train_rm.main(args(tmp_path, tiny_model_dir) + ["--data", str(empty)])
    if not torch.cuda.is_available():  # local mode: this machine is the cluster, checked before Ray is asked
        with pytest.raises(SystemExit, match="--model.device: .*no CUDA GPU"):
            train_rm.main(args(tmp_path, tiny_model_dir, "sentence", "--model.device", "cuda"))
    assert not (tmp_path / "out_sentence" / "checkpoints").exists()  # no worker ever started


@pytest.mark.slow
def test_storage_on_object_storage(tmp_path, tiny_model_dir, local_ray, s3_server):
    """Checkpoints, the run log and final/ go to an S3 bucket (a URI with query parameters); the model loads
    after downloading it. The workers resolve the model on their node and find credentials in their own
    environment (local_ray starts after s3_server), as the nodes of a cloud cluster do."""
    make_uri, _ = s3_server
    location = make_uri("train_rm/run")
    base = args(tmp_path, tiny_model_dir, "response", "--max_pairs", "4") + ["--storage", location]
    train_rm.main(base)
    storage = Storage(location)
    assert storage.exists("checkpoints/epoch_001/train_state.json") and storage.exists("heldout_pairs.jsonl")
    with pytest.raises(SystemExit, match="--resume to continue"):  # the earlier run is found in the bucket
        train_rm.main(base)
    report = train_rm.main(base + ["--train.epochs", "2", "--resume"])  # checkpoint read back from the bucket
    assert report["epochs"] == 2 and report["steps"] == 2
    assert storage.exists("results.json") and storage.exists("final/reward_model.yaml")
    assert json.loads(storage.read_text("results.json"))["accuracy"] == report["accuracy"]
    assert report["final"] == storage.location_of("final")
    rows = [json.loads(line) for line in storage.read_text("metrics.jsonl").splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2]  # rank 0's run log, kept across the resume
    assert not (tmp_path / "out_response").exists()  # nothing written to a local folder
    with storage.readable_dir("final") as folder:
        model, _, config = load_reward_model(folder)
    assert config.kind == "response" and type(model).__name__ == "ResponseRewardModel"


def test_relative_storage_refused_on_a_cluster(monkeypatch):
    """Under `ray job submit` (RAY_ADDRESS set) a relative --storage would land in the job's temporary working
    directory on the head node: refused, naming the option and the fix, before Ray is joined."""
    def started(*args, **kwargs):
        raise AssertionError("jobs.train_rm joined Ray before refusing --storage")
    monkeypatch.setattr(train_rm, "init_ray", started)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(SystemExit, match=r"--storage 'runs/rm' is a relative path.*Fix: an absolute path"):
        train_rm.main(["--data", "pairs.jsonl", "--storage", "runs/rm"])
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SystemExit, match=r"--storage 'runs/train_rm' is a relative path"):  # the default, --ray.address
        train_rm.main(["--data", "pairs.jsonl", "--ray.address", "127.0.0.1:1"])
