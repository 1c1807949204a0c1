"""The jobs submitted with `ray job submit` to a real multi-node Ray cluster on this machine (tests/multinode.py):
a head and two worker nodes, each worker with its own /tmp and home cache and without the checkout, as nodes of a
real cluster. Anything an actor reads from the driver's disk fails here.

Roles are pinned to nodes with custom resources, as a user pins them to node types: the scorer on the head,
the vLLM engine on worker0, the two DeepSpeed learner ranks on worker1.
"""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.runlog import MARKER, metrics_history
from tests.multinode import NodeSpec

pytestmark = pytest.mark.slow

HEAD = NodeSpec(1, {"endorl_scorer": 4})
WORKERS = (NodeSpec(1, {"endorl_engine": 4}), NodeSpec(2, {"endorl_learner": 4}))


@pytest.fixture(scope="module")
def cluster(multinode_cluster_factory):
    return multinode_cluster_factory(workers=WORKERS, head=HEAD)


@pytest.fixture(scope="module")
def shared_model(cluster, tiny_model_dir) -> str:
    """The tiny model on the shared storage every node mounts (a path there works as is on every node)."""
    target = cluster.shared_dir / "tiny_model"
    if not target.exists():
        shutil.copytree(tiny_model_dir, target)
    return str(target)


def rlhf_args(model: str, storage, *extra) -> list[str]:
    return ["python", "-m", "jobs.rlhf", "--model.name", model, "--storage", str(storage), "--rollout_dtype", "float32",
            "--steps", "2", "--prompts_per_step", "2", "--rollout.n_samples", "2", "--rollout.max_new_tokens", "8",
            "--rollout.max_prompt_tokens", "128", "--learner.ranks", "2", "--learner.lr", "1e-3", "--eval_every", "1",
            "--checkpoint_every", "1", "--sync_check_every", "1", "--placement.timeout_s", "120",
            "--scorer_resources", "{endorl_scorer: 1}", "--rollout.resources", "{endorl_engine: 1}",
            "--learner.resources", "{endorl_learner: 1}", *extra]


def metrics(storage) -> list[dict]:
    """The run's rows as the run log reads them back (a resume appends a {"resumed_from": step} record)."""
    return metrics_history((storage / "metrics.jsonl").read_text())


def test_rlhf_runs_across_nodes_writes_to_storage_and_resumes(cluster, shared_model):
    storage = cluster.shared_dir / "rlhf"
    first = cluster.submit_cli(rlhf_args(shared_model, storage), timeout_s=900)
    assert first.status == "SUCCEEDED", first.output[-6000:]

    # every actor ran where its role is pinned: three roles on three nodes, recorded in the run log
    nodes = json.loads((storage / "nodes.json").read_text())
    ids = cluster.node_ids
    assert {n["node_id"] for n in nodes["scorers"]} == {ids["head"]}
    assert {n["node_id"] for n in nodes["rollout_engines"]} == {ids["worker0"]}
    assert [n["node_id"] for n in nodes["policy_learners"]] == [ids["worker1"]] * 2

    # each checkpoint holds both ranks' shards, written from worker1, and the driver's marker
    for step in (1, 2):
        folder = storage / "checkpoints" / f"step_{step:06d}"
        assert json.loads((folder / MARKER).read_text()) == {"step": step}
        tag = (folder / "policy" / "latest").read_text().strip()
        names = {p.name for p in (folder / "policy" / tag).iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names, names
    before = metrics(storage)
    assert [row["step"] for row in before] == [0, 1, 2]
    assert (storage / "curves.png").stat().st_size > 1000

    # a second job continues from the newest checkpoint on the storage: the learners load it on worker1; one more
    # step moves the (constant) LR schedule's end, which a resume refuses unless it is named
    second = cluster.submit_cli(rlhf_args(shared_model, storage, "--steps", "3", "--resume", "--resume_force", "steps"),
                                timeout_s=900)
    assert second.status == "SUCCEEDED", second.output[-6000:]
    rows = metrics(storage)
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and rows[:3] == before  # kept as they were
    assert '{"resumed_from": 2}' in (storage / "metrics.jsonl").read_text()  # appended, not rewritten
    assert (storage / "checkpoints" / "step_000003" / MARKER).exists()


def test_score_converts_the_bundled_model_on_the_node_that_loads_it(cluster, tmp_path):
    # the input lies on the driver's disk only (tmp_path is hidden from the workers): it is read there and shipped
    rows = [{"prompt": "What is 2 + 2?", "response": "4."}, {"prompt": "Name a colour.", "response": "Blue."}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = cluster.shared_dir / "scored.parquet"
    # the replica is pinned to worker0, whose home cache is empty: it converts the bundled GGUF model there
    result = cluster.submit_cli(["python", "-m", "jobs.score", "--input", str(source), "--output", str(output),
                                 "--scoring.replicas", "1", "--scoring.cpus_per_replica", "1",
                                 "--scoring.resources", "{endorl_engine: 1}", "--placement.timeout_s", "120"],
                                timeout_s=600)
    assert result.status == "SUCCEEDED", result.output[-6000:]
    scored = pq.read_table(output).to_pylist()
    assert [row["response"] for row in scored] == ["4.", "Blue."]
    for row in scored:  # R = sum of the token rewards, one per response token (EOS included)
        assert len(row["token_rewards"]) >= 2 and row["reward"] == pytest.approx(sum(row["token_rewards"]), abs=1e-3)


def test_a_relative_storage_is_refused_under_a_submitted_job(cluster, shared_model):
    result = cluster.submit_cli(rlhf_args(shared_model, "runs/rlhf"), timeout_s=300)
    assert result.status == "FAILED"
    assert "--storage 'runs/rlhf' is a relative path" in result.output and "s3://" in result.output


def test_cuda_without_gpu_nodes_and_a_rank_too_big_fail_after_the_wait(cluster, shared_model):
    cuda = cluster.submit_cli(rlhf_args(shared_model, cluster.shared_dir / "cuda", "--model.device", "cuda",
                                        "--placement.timeout_s", "5"), timeout_s=300)
    assert cuda.status == "FAILED"
    assert "waited" in cuda.output and "'GPU': 1.0" in cuda.output and "The cluster has no GPU" in cuda.output
    big = cluster.submit_cli(rlhf_args(shared_model, cluster.shared_dir / "big", "--learner.cpus_per_rank", "64",
                                       "--placement.timeout_s", "5"), timeout_s=300)
    assert big.status == "FAILED"
    assert "No node of the cluster has room for even one of them" in big.output and "policy learners" in big.output


def test_train_rm_trains_onto_object_storage_from_the_workers(cluster, shared_model, s3_server, tmp_path):
    from pipeline.storage import Storage
    from tests.multinode import DEFAULT_EXCLUDES, REPO_ROOT

    make_uri, credentials = s3_server  # moto's S3 API on 127.0.0.1; nodes get credentials as a cloud node would
    pairs = tmp_path / "pairs.jsonl"  # on the driver's disk only: read there and shipped to the workers
    pairs.write_text("".join(json.dumps({"prompt": f"Say something about item {i}.", "chosen": f"Item {i} is fine.",
                                         "rejected": "No."}) + "\n" for i in range(12)))
    storage = make_uri("cluster/train_rm")
    result = cluster.submit(
        f"python -m jobs.train_rm --data {pairs} --model.name {shared_model} --storage '{storage}' --rm.kind sentence "
        f"--rm.attn_dim 16 --train.workers 2 --train.batch_size 2 --train.max_length 64 --heldout_fraction 0.25 "
        f"--placement.timeout_s 120",
        {"working_dir": str(REPO_ROOT), "excludes": list(DEFAULT_EXCLUDES), "env_vars": dict(credentials)},
        timeout_s=900)
    assert result.status == "SUCCEEDED", result.logs[-6000:]
    run = Storage(storage)
    report = json.loads(run.read_text("results.json"))
    assert report["epochs"] == 1 and report["counts"]["heldout"] == 3
    assert run.exists("final/reward_model.yaml") and run.exists("metrics.jsonl")
