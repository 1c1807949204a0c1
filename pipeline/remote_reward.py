"""Rewards for RL from remote servers that speak OpenRLHF's remote reward protocol (EndoRL's own server does).

    jobs.rlhf --reward.remote_url http://host-a:8000/get_reward,http://host-b:8000/get_reward

A scored rollout's rows go out in requests of at most `reward.remote_batch_items` rows, dealt round-robin across
the URLs and posted concurrently. A request that fails (no connection, timeout, HTTP 408/429/5xx, a malformed
answer) is retried on the next URL in turn after remote_backoff_s * 2^k seconds; after the last attempt the error
names the URLs tried and the last failure. A 4xx refusal is not retried: the same request would fail again.

What is sent is what OpenRLHF's client sends: query = decode(prompt_ids + response_ids) with special tokens kept,
prompts = decode(prompt_ids), labels = "". The answer's response-level reward goes on the last response token (an
outcome reward, as in OpenRLHF). With `reward.remote_extensions` (the default) a request also carries EndoRL's
extension fields, which other servers ignore: the token ids as sampled and "token_rewards": true. An EndoRL server
then scores exactly those tokens and answers per-token rewards, which are used as they come: the in-process
endogenous reward, served. The remote reward replaces `token_rewards` and `reward`; the KL reference
(`ref_logprobs`) still comes from the local frozen model.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import requests

from pipeline.arrow import FLOATS, numpy_to_ragged, ragged_to_numpy
from pipeline.config import opt
from pipeline.endogenous import EndoRewardConfig

RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


@dataclasses.dataclass
class RLRewardConfig(EndoRewardConfig):
    """The endogenous reward's options plus, for RL, where to fetch the reward from instead."""
    remote_url: str = opt("", "reward servers speaking OpenRLHF's protocol, comma-separated (e.g. "
                              "http://HOST:8000/get_reward): the reward comes from them, the KL reference stays the "
                              "local frozen model; empty = the in-process endogenous reward")
    remote_timeout_s: float = opt(180.0, "seconds a request to a reward server may take (OpenRLHF's client: 180)")
    remote_attempts: int = opt(5, "attempts per request, each on the next URL (OpenRLHF's client: 5)")
    remote_backoff_s: float = opt(1.0, "wait before the first retry; doubles at each further one")
    remote_batch_items: int = opt(64, "most rows in one request (keep under the server's limits)")
    remote_extensions: bool = opt(True, "also send EndoRL's fields (token ids as sampled, token_rewards: true): an "
                                        "EndoRL server then scores exactly the sampled tokens, per token; others "
                                        "ignore them")
    remote_token_file: str = opt("", "file holding the bearer token the reward servers want (read on the node of "
                                     "the remote-reward actor)")
    remote_token_env: str = opt("", "name of an environment variable holding that bearer token")

    def __post_init__(self):
        super().__post_init__()
        for url in self.urls():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"reward.remote_url: {url!r} is not an http(s) URL. Fix: e.g. "
                                 f"--reward.remote_url http://127.0.0.1:8000/get_reward")
        if self.remote_attempts < 1 or self.remote_batch_items < 1 or not self.remote_timeout_s > 0:
            raise ValueError("reward.remote_attempts and reward.remote_batch_items must be >= 1 and "
                             "reward.remote_timeout_s > 0.")

    def urls(self) -> list[str]:
        return [url.strip() for url in self.remote_url.split(",") if url.strip()]


class RemoteRewardError(RuntimeError):
    pass


class RemoteRewardClient:
    """Posts OpenRLHF-protocol requests with retries, backoff and failover across URLs."""

    def __init__(self, cfg: RLRewardConfig, token: str = "", sleep=time.sleep):
        self.cfg, self.urls, self.sleep = cfg, cfg.urls(), sleep
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, index: int, payload: dict) -> dict:
        """The answer to request `index` (its first attempt goes to URL index % n, each retry to the next)."""
        cfg, failures = self.cfg, []
        for attempt in range(cfg.remote_attempts):
            url = self.urls[(index + attempt) % len(self.urls)]
            try:
                response = requests.post(url, json=payload, headers=self.headers, timeout=cfg.remote_timeout_s)
            except requests.RequestException as e:
                failures.append(f"{url}: {type(e).__name__}: {e}")
            else:
                if response.status_code == 200:
                    try:
                        return check_answer(response.json(), len(payload["query"]))
                    except ValueError as e:
                        failures.append(f"{url}: {e}")
                elif response.status_code in RETRIED_STATUS:
                    failures.append(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
                else:
                    hint = (f" Fix: lower --reward.remote_batch_items (now {cfg.remote_batch_items}) to fit the server's "
                            f"limits." if response.status_code == 413 else "")
                    raise RemoteRewardError(f"reward server {url} refused the request with HTTP {response.status_code}: "
                                            f"{response.text[:500]} (not retried: it would be refused again).{hint}")
            if attempt + 1 < cfg.remote_attempts:
                self.sleep(cfg.remote_backoff_s * 2 ** attempt)
        tried = sorted({self.urls[(index + a) % len(self.urls)] for a in range(cfg.remote_attempts)})
        raise RemoteRewardError(f"no reward after {cfg.remote_attempts} attempts on {', '.join(tried)}; the last: "
                                f"{failures[-1]}. Fix: check that the servers are up (an EndoRL server answers GET "
                                f"/health), or raise --reward.remote_attempts / --reward.remote_timeout_s.")


def check_answer(answer, count: int) -> dict:
    """An OpenRLHF answer with `count` finite rewards (and, if present, `count` lists of token rewards)."""
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not (isinstance(rewards, list) and len(rewards) == count
            and all(isinstance(r, (int, float)) and math.isfinite(r) for r in rewards)):
        raise ValueError(f"the answer holds no list of {count} finite `rewards`: {str(answer)[:200]}")
    return answer


def request_payload(tokenizer, prompt_ids: list, response_ids: list, extensions: bool) -> dict:
    """OpenRLHF's request for these rows (+ EndoRL's extension fields)."""
    prompts = [list(map(int, p)) for p in prompt_ids]
    responses = [list(map(int, r)) for r in response_ids]
    payload = {"query": [tokenizer.decode(p + r, skip_special_tokens=False) for p, r in zip(prompts, responses)],
               "prompts": [tokenizer.decode(p, skip_special_tokens=False) for p in prompts],
               "labels": [""] * len(prompts)}
    if extensions:
        payload.update(prompt_ids=prompts, response_ids=responses, token_rewards=True)
    return payload


def token_rewards_from(answer: dict, response_lengths: list[int]) -> list[np.ndarray]:
    """Per-token rewards of the rows: the server's own when it sent them for every token, else the response-level
    reward on the last token (an outcome reward)."""
    dense = answer.get("token_rewards")
    if isinstance(dense, list) and [len(d) if isinstance(d, list) else -1 for d in dense] == response_lengths:
        return [np.asarray(d, dtype=np.float32) for d in dense]
    rows = []
    for reward, length in zip(answer["rewards"], response_lengths):
        row = np.zeros(length, dtype=np.float32)
        row[-1:] = reward  # r_H = R: the whole reward on the final token
        rows.append(row)
    return rows


def remote_rewarded(table: pa.Table, client: RemoteRewardClient, tokenizer) -> pa.Table:
    """A scored rollout table with `reward` and `token_rewards` replaced by the remote servers' rewards."""
    prompt_ids, response_ids = ragged_to_numpy(table["prompt_ids"]), ragged_to_numpy(table["response_ids"])
    size = client.cfg.remote_batch_items
    starts = list(range(0, table.num_rows, size))
    payloads = [request_payload(tokenizer, prompt_ids[s:s + size], response_ids[s:s + size], client.cfg.remote_extensions)
                for s in starts]
    with ThreadPoolExecutor(max_workers=max(1, min(len(payloads), 4 * len(client.urls)))) as pool:
        answers = list(pool.map(client.post, range(len(payloads)), payloads))
    rewards, token_rewards = [], []
    for start, answer in zip(starts, answers):
        rewards += [float(r) for r in answer["rewards"]]
        token_rewards += token_rewards_from(answer, [len(r) for r in response_ids[start:start + size]])
    table = table.set_column(table.schema.get_field_index("reward"), pa.field("reward", pa.float32()),
                             pa.array(rewards, pa.float32()))
    return table.set_column(table.schema.get_field_index("token_rewards"), pa.field("token_rewards", FLOATS),
                            numpy_to_ragged(token_rewards, pa.float32()))
