"""The remote-reward client: OpenRLHF's request, splitting across URLs, retries, failover, clear errors.

Fake: `ScriptedServer` is a stdlib HTTP server on 127.0.0.1 standing in for a reward server, so a test can script
its failures (status codes, malformed answers). The client against EndoRL's real server is in tests/jobs/test_serve.py.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrow import SCORED_FIELDS, numpy_to_ragged, request_table
from pipeline.models import load_tokenizer
from pipeline.remote_reward import (RemoteRewardClient, RemoteRewardError, RLRewardConfig, remote_rewarded,
                                    request_payload, token_rewards_from)
from tests.ray_processes import free_ports


class ScriptedServer:
    """Answers POSTs from a script: each entry is (status, body) or None (a good answer: reward = 10 * row + port)."""

    def __init__(self, script=()):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((body, self.headers.get("Authorization")))
                step = server.script.pop(0) if server.script else None
                if step is None:
                    rewards = [float(len(q)) + server.port / 1e5 for q in body["query"]]
                    status, answer = 200, json.dumps({"rewards": rewards, "scores": rewards, "extra_logs": {}})
                else:
                    status, answer = step
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args):
                pass

        (self.port,) = free_ports(1)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/get_reward"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []
    yield lambda script=(): made.append(ScriptedServer(script)) or made[-1]
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def scored_table(tokenizer, n):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    responses = [tokenizer(" hi" * (i + 1), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for i in range(n)]
    table = request_table([prompt] * n, responses, [True] * n)
    columns = [numpy_to_ragged([np.ones(len(r)) for r in responses], pa.float32()),
               numpy_to_ragged([np.full(len(r), -1.0) for r in responses], pa.float32()), pa.array([9.0] * n, pa.float32())]
    for (name, type_), column in zip(SCORED_FIELDS, columns):
        table = table.append_column(pa.field(name, type_), column)
    return table


def client(urls, sleeps=None, **overrides):
    cfg = RLRewardConfig(remote_url=",".join(urls), remote_backoff_s=0.5, remote_attempts=3, remote_timeout_s=10,
                         **overrides)
    return RemoteRewardClient(cfg, sleep=sleeps.append if sleeps is not None else lambda seconds: None)


def test_request_is_openrlhfs_and_rewards_go_on_the_last_token(tokenizer, servers):
    server = servers()
    table = scored_table(tokenizer, 3)
    out = remote_rewarded(table, client([server.url], remote_extensions=False), tokenizer)
    (body, auth), = server.requests
    prompt_ids = table["prompt_ids"].to_pylist()
    response_ids = table["response_ids"].to_pylist()
    assert body == {"query": [tokenizer.decode(p + r, skip_special_tokens=False) for p, r in zip(prompt_ids, response_ids)],
                    "prompts": [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids],
                    "labels": ["", "", ""]} and auth is None
    rewards = out["reward"].to_pylist()
    assert rewards == pytest.approx([len(q) + server.port / 1e5 for q in body["query"]])
    for reward, row in zip(rewards, out["token_rewards"].to_pylist()):  # an outcome reward on the final token
        assert row[-1] == pytest.approx(reward) and not any(row[:-1])
    assert out["ref_logprobs"].to_pylist() == table["ref_logprobs"].to_pylist()  # the KL reference stays local
    assert out.schema == table.schema


def test_rows_are_dealt_across_urls_in_order(tokenizer, servers):
    a, b = servers(), servers()
    table = scored_table(tokenizer, 5)
    out = remote_rewarded(table, client([a.url, b.url], remote_batch_items=2), tokenizer)
    # batches go out concurrently, so a server sees its batches in either order; which rows went where is in the rewards
    assert sorted(len(body["query"]) for body, _ in a.requests) == [1, 2] and [len(body["query"]) for body, _ in b.requests] == [2]
    ports = [a.port, a.port, b.port, b.port, a.port]
    queries = request_payload(tokenizer, table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist(), False)["query"]
    assert out["reward"].to_pylist() == pytest.approx([len(q) + p / 1e5 for q, p in zip(queries, ports)])
    assert all("prompt_ids" in body and body["token_rewards"] is True for body, _ in a.requests)  # EndoRL's extension, on by default


def test_failures_are_retried_with_backoff_on_the_next_url(tokenizer, servers):
    a, b = servers([(503, '{"error": "busy"}'), (200, '{"rewards": [1.0]}')]), servers([(500, "oops")])
    sleeps = []
    answer = client([a.url, b.url], sleeps).post(0, request_payload(tokenizer, [[1, 2]], [[3, 4]], False))
    # attempt 1 -> a: 503, wait 0.5 s; attempt 2 -> b: 500, wait 1 s; attempt 3 -> a: the answer
    assert answer["rewards"] == [1.0] and sleeps == [0.5, 1.0] and len(a.requests) == 2 and len(b.requests) == 1


def test_a_clear_error_after_the_last_attempt(tokenizer, servers):
    (dead,) = free_ports(1)  # nothing listens there
    bad = servers([(200, '{"rewards": [1.0, 2.0]}')] * 3)  # the wrong count: a malformed answer, retried
    with pytest.raises(RemoteRewardError) as info:
        client([bad.url, f"http://127.0.0.1:{dead}/get_reward"]).post(0, request_payload(tokenizer, [[1]], [[2]], False))
    message = str(info.value)
    assert "no reward after 3 attempts" in message and str(dead) in message and bad.url in message
    assert "no list of 1 finite `rewards`" in message and "GET /health" in message


def test_a_refusal_is_not_retried(tokenizer, servers):
    server = servers([(422, '{"error": {"field": "query[0]", "message": "bad"}}')])
    with pytest.raises(RemoteRewardError, match="refused the request with HTTP 422.*query\\[0\\].*not retried"):
        client([server.url]).post(0, request_payload(tokenizer, [[1]], [[2]], False))
    assert len(server.requests) == 1


def test_bearer_token_is_sent(tokenizer, servers):
    server = servers()
    cfg = RLRewardConfig(remote_url=server.url)
    RemoteRewardClient(cfg, token="s3cret").post(0, request_payload(tokenizer, [[1]], [[2]], False))
    assert server.requests[0][1] == "Bearer s3cret"


def test_per_token_rewards_are_used_only_when_they_fit():
    dense = token_rewards_from({"rewards": [3.0, 1.0], "token_rewards": [[1.0, 2.0], [1.0]]}, [2, 1])
    assert [d.tolist() for d in dense] == [[1.0, 2.0], [1.0]]
    outcome = token_rewards_from({"rewards": [3.0, 1.0], "token_rewards": [[1.0], [1.0]]}, [2, 1])
    assert [d.tolist() for d in outcome] == [[0.0, 3.0], [1.0]]


def test_config_refuses_what_cannot_work():
    assert RLRewardConfig(remote_url=" http://a:1/get_reward, https://b/get_reward ").urls() == [
        "http://a:1/get_reward", "https://b/get_reward"]
    with pytest.raises(ValueError, match="not an http\\(s\\) URL"):
        RLRewardConfig(remote_url="a:1/get_reward")
    with pytest.raises(ValueError, match="remote_attempts"):
        RLRewardConfig(remote_url="http://a/get_reward", remote_attempts=0)
