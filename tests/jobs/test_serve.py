"""jobs.serve over real HTTP on 127.0.0.1 (tiny model): both endpoints against jobs.score on the same rows,
OpenRLHF's client request, every bad input, auth, timeouts, health, metrics, and RL with the served reward.

Two servers, each `python -m jobs.serve` in its own process with its own embedded Ray, started once per module:
an open one (with a sentence RM) for the endpoints, and one with a bearer token and a request timeout too short
to score anything, for auth and timeouts.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from jobs import score, serve
from pipeline.models import load_tokenizer
from tests.ray_processes import free_ports, kill, processes_with

WINDOW = 256
ROWS = [{"prompt": "What is 2+2?", "response": "4."},
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "response": "An apple, or a pear."},
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "response": "A pear."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}],
         "response": "Hi! Nice to meet you."},
        {"prompt": "word " * 300, "response": "Too long a prompt: its oldest tokens are dropped."},
        {"prompt": "Count.", "response": "one two " * 150}]  # the response alone overflows: cut, scored unfinished
SYSTEM_PROMPT = "Answer as a pirate would."
TOKEN = "test-" + uuid.uuid4().hex


class Server:
    """`python -m jobs.serve ...` in its own session; every Ray process it starts carries `tag` in its environment."""

    def __init__(self, log_dir, *args, env=None):
        (self.port,) = free_ports(1)
        self.url, self.tag = f"http://127.0.0.1:{self.port}", uuid.uuid4().hex
        self.log = log_dir / f"serve-{self.port}.log"
        environ = {**os.environ, "ENDORL_TEST_SERVER": self.tag, **(env or {})}
        # Ctrl-C starts ignored, as for anything a script starts with `&` (and CI's runner may): jobs.serve must
        # still stop on it
        self.process = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--http.port", str(self.port), *args],
                                        stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=environ,
                                        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def wait_ready(self, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if "serving the reward at" in self.log.read_text():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"jobs.serve did not start:\n{self.log.read_text()[-3000:]}")

    def interrupt(self):
        """Ctrl-C, as a user stops it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)

    def stop(self):
        """Wait for it to end after `interrupt` (an error if it does not); then end whatever of its Ray is left, by pid."""
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"jobs.serve did not stop within 60 s of Ctrl-C:\n{self.log.read_text()[-2000:]}")
        finally:
            kill(processes_with([self.tag]))
        assert "stopping the reward server" in self.log.read_text()


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tiny_sentence_rm_dir, tmp_path_factory):
    """Both servers start at once (their startups overlap); each fixture below waits for its own."""
    logs = tmp_path_factory.mktemp("serve_logs")
    # float32: the exact comparisons below need batch-invariant sums, which bf16 (auto on avx512_bf16 CPUs) lacks
    common = ["--model.name", tiny_model_dir, "--model.dtype", "float32", "--model.max_length", str(WINDOW), "--ray.address", "local", "--ray.num_cpus", "2",
              "--ray.dashboard", "false", "--replicas.cpus_per_replica", "1"]
    servers = {"open": Server(logs, *common, "--sentence_rm", tiny_sentence_rm_dir, "--limits.max_items", "8",
                              "--limits.max_request_tokens", "1500", "--limits.max_body_bytes", "60000"),
               "guarded": Server(logs, *common, "--auth.token_env", "ENDORL_TEST_TOKEN", "--limits.request_timeout_s",
                                 "0.001", env={"ENDORL_TEST_TOKEN": TOKEN})}
    yield servers
    for server in servers.values():
        server.interrupt()
    stuck = []
    for server in servers.values():  # every server is stopped, even after one that would not stop
        try:
            server.stop()
        except AssertionError as e:
            stuck.append(e)
    if stuck:
        raise stuck[0]


@pytest.fixture(scope="module")
def server(launched):
    return launched["open"].wait_ready()


@pytest.fixture(scope="module")
def guarded(launched):
    return launched["guarded"].wait_ready()


@pytest.fixture(scope="module")
def scored_by_job(launched, tmp_path_factory, tiny_model_dir, local_ray):
    """jobs.score's output on ROWS: with the defaults, with a system prompt and the mean form, and with the
    contrastive form (computed while the servers start)."""
    folder = tmp_path_factory.mktemp("score")
    source = folder / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    outputs = {}
    for name, extra in [("default", []), ("pirate_mean", ["--reward.system_prompt", SYSTEM_PROMPT,
                                                          "--reward.normalize", "mean"]),
                        ("contrastive", ["--reward.form", "contrastive", "--reward.principle", SYSTEM_PROMPT])]:
        out = folder / f"{name}.jsonl"
        score.main(["--model", tiny_model_dir, "--input", str(source), "--output", str(out), "--base.max_length",
                    str(WINDOW), "--base.dtype", "float32", "--ray.num_cpus", "2", *extra])
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    return outputs


def post(server, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                         timeout=120)


def items(rows):
    return [{"prompt": row["prompt"], "response": row["response"]} for row in rows]


def test_v1_reward_equals_jobs_score(scored_by_job, server):
    answer = post(server, "/v1/reward", {"items": items(ROWS), "token_rewards": True})
    assert answer.status_code == 200, answer.text
    for got, expected in zip(answer.json()["items"], scored_by_job["default"]):
        assert abs(got["reward"] - expected["reward"]) < 1e-4
        assert np.abs(np.array(got["token_rewards"]) - np.array(expected["token_rewards"])).max() < 1e-4
        assert got["prompt_tokens_dropped"] == expected["prompt_tokens_dropped"]
    dropped = [item["prompt_tokens_dropped"] for item in answer.json()["items"]]
    assert dropped[4] > 50 and dropped[:4] == [0, 0, 0, 0]  # the over-window prompt, reported on its item
    assert answer.json()["items"][5]["response_tokens_dropped"] > 0
    # the options: a system prompt and the mean form, against jobs.score run with the same two flags
    answer = post(server, "/v1/reward", {"items": items(ROWS), "system_prompt": SYSTEM_PROMPT,
                                         "reward": {"normalize": "mean"}})
    rewards = [item["reward"] for item in answer.json()["items"]]
    assert np.abs(np.array(rewards) - [row["reward"] for row in scored_by_job["pirate_mean"]]).max() < 1e-4
    assert "token_rewards" not in answer.json()["items"][0]
    # the contrastive form: the extra contexts scored with the rows, on both sides (they count in a request's
    # tokens: one request a row, under this server's limits.max_request_tokens)
    got_items = []
    for row in ROWS:
        answer = post(server, "/v1/reward", {"items": items([row]), "token_rewards": True,
                                             "reward": {"form": "contrastive", "principle": SYSTEM_PROMPT}})
        assert answer.status_code == 200, answer.text
        got_items += answer.json()["items"]
    for got, expected, default in zip(got_items, scored_by_job["contrastive"], scored_by_job["default"], strict=True):
        assert np.abs(np.array(got["token_rewards"]) - np.array(expected["token_rewards"])).max() < 1e-4
        assert abs(got["reward"] - default["reward"]) > 1e-3


def test_openrlhf_clients_request(server, scored_by_job, tiny_model_dir):
    """Built as OpenRLHF's client builds it: the prompt through the chat template as text, the sampled tokens
    (EOS kept) decoded with special tokens, one `requests.post` with json= (openrlhf/utils/remote_rm_utils.py)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = ROWS[:4]  # within the window: OpenRLHF's client truncates prompts its own way
    prompts, queries = [], []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_token_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        action_token_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        queries.append(tokenizer.decode(prompt_token_ids + action_token_ids, skip_special_tokens=False))
        prompts.append(prompt)
    response = requests.post(url=server.url + "/get_reward", json={"query": queries, "prompts": prompts,
                                                                   "labels": [""] * len(rows)},
                             headers={"Content-Type": "application/json"}, timeout=180)
    response.raise_for_status()
    answer = response.json()
    assert set(answer) >= {"rewards", "scores", "extra_logs"} and answer["scores"] == answer["rewards"]
    expected = [row["reward"] for row in scored_by_job["default"][:4]]
    assert np.abs(np.array(answer["rewards"]) - expected).max() < 1e-4
    assert answer["extra_logs"]["prompt_tokens_dropped"] == [0.0] * 4


def test_sentence_rm_next_to_the_endogenous_reward(server, tiny_model_dir, tiny_sentence_rm_dir, scored_by_job):
    from actors.sentence_rm import SentenceRMScorer
    from pipeline.arrow import request_table
    from pipeline.chat import encode_row

    answer = post(server, "/v1/reward", {"items": items(ROWS[:4]), "sentence_rm": True, "token_rewards": True}).json()
    tokenizer = load_tokenizer(tiny_model_dir)
    encoded = [encode_row(tokenizer, [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                          else r["prompt"], r["response"], WINDOW) for r in ROWS[:4]]
    expected = SentenceRMScorer(tiny_sentence_rm_dir).score(
        request_table([e[0] for e in encoded], [e[1] for e in encoded], [e[2] for e in encoded]))
    for item, reward, dense, row in zip(answer["items"], expected["sentence_reward"].to_pylist(),
                                        expected["sentence_rewards"].to_pylist(), scored_by_job["default"]):
        assert abs(item["sentence_reward"] - reward) < 1e-4 and np.allclose(item["sentence_rewards"], dense, atol=1e-4)
        assert abs(item["reward"] - row["reward"]) < 1e-4


BAD = [  # (what, body bytes, status, field)
    ("body over the size limit", json.dumps({"items": [{"prompt": "p", "response": "x" * 70000}]}).encode(), 413, "body"),
    ("too many items", json.dumps({"items": [{"prompt": "p", "response": "r"}] * 9}).encode(), 413, "items"),
    ("too many tokens", json.dumps({"items": [{"prompt": "word " * 250, "response": "r"}] * 8}).encode(), 413, "request"),
    ("malformed JSON", b'{"items": [{"prompt": "p", "response": "r"}', 400, "body"),
    ("non-UTF-8 bytes", b'{"items": [{"prompt": "\xff\xfe", "response": "r"}]}', 400, "body"),
    ("a missing field", json.dumps({"items": [{"prompt": "p"}]}).encode(), 422, "items[0].response"),
    ("an ill-typed field", json.dumps({"items": [{"prompt": ["p"], "response": "r"}]}).encode(), 422, "items[0].prompt"),
    ("an empty response", json.dumps({"items": [{"prompt": "p", "response": ""}]}).encode(), 422, "items[0].response"),
    ("an unknown option", json.dumps({"items": [{"prompt": "p", "response": "r"}], "tokens": 1}).encode(), 422, "tokens"),
    ("a bad reward form", json.dumps({"items": [{"prompt": "p", "response": "r"}], "reward": {"normalize": "max"}}).encode(),
     422, "reward.normalize"),
    ("over the window, policy error", json.dumps({"items": [{"prompt": "word " * 300, "response": "r"}],
                                                  "reward": {"truncation": "error"}}).encode(), 413, "items[0]"),
]


def test_each_bad_request_gets_its_own_error_while_the_others_are_served(server):
    good = {"items": items(ROWS[:2])}
    expected = post(server, "/v1/reward", good).json()
    jobs = [("good", json.dumps(good).encode(), 200, None)] * 6 + BAD
    with ThreadPoolExecutor(8) as pool:  # all at once: bad requests land next to good ones in the same batches
        answers = list(pool.map(lambda job: post(server, "/v1/reward", raw=job[1]), jobs))
    for (what, _, status, field), answer in zip(jobs, answers):
        assert answer.status_code == status, (what, answer.text)
        if field:
            error = answer.json()["error"]
            assert error["field"] == field and error["message"], what
        else:  # the same rows packed next to other requests' rows: float32 sums in another order (|diff| < 1e-4)
            got = answer.json()["items"]
            assert [{**g, "reward": 0} for g in got] == [{**e, "reward": 0} for e in expected["items"]]
            assert [g["reward"] for g in got] == pytest.approx([e["reward"] for e in expected["items"]], abs=1e-4)
    assert post(server, "/get_reward", {"query": ["no prompt"]}).json()["error"]["field"] == "prompts"
    assert requests.get(server.url + "/nowhere", timeout=10).status_code == 404
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # still serving


def test_health_and_serve_metrics(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["window"] == WINDOW and health["sentence_rm"] and not health["auth"]
    assert health["limits"]["max_items"] == 8
    assert requests.get(server.url + "/-/healthz", timeout=10).status_code == 200  # Serve's own
    metrics_url = server.log.read_text().split("Ray Serve metrics (Prometheus): ")[1].split(",")[0].split()[0]
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while True:
        text = requests.get(metrics_url, timeout=10).text
        if "ray_serve_num_http_requests" in text and "endorl_reward_requests" in text:
            break
        assert time.monotonic() < deadline, "Serve's request metrics never appeared at " + metrics_url
        post(server, "/v1/reward", {"items": items(ROWS[:1])})
        time.sleep(2)


def test_bearer_token_and_request_timeout(guarded):
    body = {"items": items(ROWS[:1])}
    assert post(guarded, "/v1/reward", body).status_code == 401
    assert post(guarded, "/v1/reward", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    unauthorized = post(guarded, "/get_reward", {"query": ["q"], "prompts": ["q"]})
    assert unauthorized.status_code == 401 and unauthorized.headers["WWW-Authenticate"] == "Bearer"
    # the right token passes; then no request can be scored within limits.request_timeout_s = 1 ms: 503, retry later
    late = post(guarded, "/v1/reward", body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert late.status_code == 503 and late.json()["error"]["field"] == "request" and late.headers["Retry-After"]
    assert requests.get(guarded.url + "/health", timeout=10).json()["auth"] is True
    assert TOKEN not in guarded.log.read_text()  # never printed, never on the command line


def test_refusals_before_ray_starts(monkeypatch, tmp_path, tiny_model_dir):
    def started(*args, **kwargs):
        raise AssertionError("jobs.serve started Ray before refusing the input")
    monkeypatch.setattr(serve, "init_ray", started)
    for args, match in [(["--http.host", "0.0.0.0"], "serves beyond this machine, and no auth token is set"),
                        (["--auth.token_file", str(tmp_path / "none")], "auth.token_file .* cannot read it"),
                        (["--auth.token_env", "ENDORL_NO_SUCH_TOKEN"], "ENDORL_NO_SUCH_TOKEN is unset"),
                        (["--limits.max_request_tokens", "99999"], "more than --batching.max_batch_tokens"),
                        (["--openrlhf_reward", "sentence_rm"], "needs --sentence_rm"),
                        (["--model.name", str(tmp_path / "no_model")], "--model.name: model path .* does not exist")]:
        with pytest.raises(SystemExit, match=match):
            serve.main(["--ray.address", "local", "--model.name", tiny_model_dir, *args])
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit, match=f"--http.port {busy.getsockname()[1]}: cannot bind"):
            serve.main(["--ray.address", "local", "--model.name", tiny_model_dir, "--http.port", str(busy.getsockname()[1])])


def test_gpu_config_asks_for_gpus_autoscaling_and_a_token():
    """configs/serve_gpu.yaml, as far as a machine without GPUs can check it: the deployment it builds."""
    from pipeline.config import parse_config

    cfg = parse_config(serve.ServeJobConfig, ["--config", "configs/serve_gpu.yaml"])
    with pytest.raises(SystemExit, match="ENDORL_SERVE_TOKEN is unset"):
        serve.check_config(cfg, cfg.http.host, {})
    token = serve.check_config(cfg, cfg.http.host, {"ENDORL_SERVE_TOKEN": "t0ken"})
    deployment = serve.make_app(cfg, token, cfg.replicas.cpus_per_replica)._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 1 and deployment.ray_actor_options["num_cpus"] == 4
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)


def test_serve_run_builds_the_same_application(monkeypatch, tiny_model_dir):
    """`serve run jobs.serve:build_app key=value ...`: the builder as Serve's CLI calls it (ray/serve/scripts.py)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    builder = import_attr("jobs.serve:build_app")
    app = call_user_app_builder_with_args_if_necessary(builder, {"model.name": tiny_model_dir, "replicas.cpus_per_replica": "2"})
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 2
    with pytest.raises(SystemExit, match="unknown option --modle.name; did you mean --model.name"):
        builder({"modle.name": tiny_model_dir})
    monkeypatch.setenv("RAY_SERVE_DEFAULT_HTTP_HOST", "0.0.0.0")  # Serve's own HTTP options: beyond loopback
    with pytest.raises(SystemExit, match="serves beyond this machine"):
        builder({"model.name": tiny_model_dir})


def test_remote_reward_client_against_the_server(server, tiny_model_dir):
    """The RL side's client on EndoRL's server: with the extension, exactly the in-process reward per token."""
    from actors.base_model import EndogenousScorer
    from pipeline.endogenous import EndoRewardConfig
    from pipeline.models import ModelConfig
    from pipeline.remote_reward import RemoteRewardClient, RLRewardConfig, remote_rewarded
    from pipeline.arrow import request_table

    tokenizer = load_tokenizer(tiny_model_dir)
    rng = np.random.default_rng(0)  # random tokens, as a random model samples them: text does not round-trip
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Go."}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    responses = [rng.integers(0, len(tokenizer), size=n).tolist() + [tokenizer.eos_token_id] for n in (3, 9, 5)]
    local = EndogenousScorer(ModelConfig(name=tiny_model_dir, dtype="float32"), EndoRewardConfig()).score(
        request_table([prompt] * 3, responses, [True] * 3))
    for extensions in (True, False):
        client = RemoteRewardClient(RLRewardConfig(remote_url=server.url + "/get_reward", remote_batch_items=2,
                                                   remote_extensions=extensions))
        served = remote_rewarded(local, client, tokenizer)
        if extensions:
            assert np.abs(np.array(served["reward"]) - np.array(local["reward"])).max() < 1e-4
            for got, want in zip(served["token_rewards"].to_pylist(), local["token_rewards"].to_pylist()):
                assert np.abs(np.array(got) - want).max() < 1e-4
        else:  # text only: a reward for the re-tokenized text, placed on the final token
            assert all(row[-1] == reward and not any(row[:-1]) for row, reward in
                       zip(served["token_rewards"].to_pylist(), served["reward"].to_pylist()))


@pytest.mark.slow
def test_rl_with_the_served_reward_gives_the_same_metrics(server, tmp_path, tiny_model_dir, local_ray):
    """The same tiny run twice: the reward in-process, then from the server (the KL reference local in both)."""
    from jobs import rlhf

    def served_requests():  # Serve's access log of the replica, forwarded to the server's output
        return server.log.read_text().count("POST /get_reward 200")

    before, runs = served_requests(), {}
    for name, extra in [("in_process", []), ("served", ["--reward.remote_url", server.url + "/get_reward",
                                                               "--reward.remote_batch_items", "8"])]:
        rlhf.main(["--local", "--model.name", tiny_model_dir, "--model.dtype", "float32", "--learner.dtype", "float32",
                   "--rollout_dtype", "float32", "--steps", "1",
                   "--prompts_per_step", "2", "--rollout.n_samples", "2", "--rollout.max_new_tokens", "8",
                   "--rollout.max_prompt_tokens", "128", "--learner.ranks", "2", "--learner.zero_stage", "2",
                   "--learner.lr", "1e-3", "--eval_every", "1", "--sync_check_every", "0", "--checkpoint_every", "0", "--export", "false",
                   "--storage", str(tmp_path / name), *extra])
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    # the served run did ask the server: a step's 4 rows, and 2 evaluations (before and after it) x 32 rows, in
    # requests of at most 8 rows
    deadline = time.monotonic() + 60
    while served_requests() - before < 9:
        assert time.monotonic() < deadline, f"{served_requests() - before} /get_reward requests reached the server"
        time.sleep(1)
    assert [m["step"] for m in runs["served"]] == [m["step"] for m in runs["in_process"]] == [0, 1]
    for expected, got in zip(runs["in_process"], runs["served"]):
        assert set(got) == set(expected)
        for key, value in expected.items():
            if not key.startswith(("time/", "sync/seconds")):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
