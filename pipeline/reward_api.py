"""The reward service's requests and answers: parsing, validation, limits and auth. No Ray, no model.

Two protocols, both scored by the packed endogenous scorer that `jobs.score` uses:

  POST /v1/reward (EndoRL's own)
      {"items": [{"prompt": str | [{"role", "content"}, ...], "response": str}, ...],
       "token_rewards": bool, "sentence_rm": bool, "system_prompt": str, "reward": {EndoRewardConfig fields}}
   -> {"items": [{"reward", "prompt_tokens_dropped", "response_tokens_dropped",
                  "token_rewards" (asked), "sentence_reward" + "sentence_rewards" (asked)}, ...]}   (request order)
      Items are encoded exactly as `jobs.score` encodes rows (pipeline.chat.encode_row), with the extra contexts of
      reward.form pmi or contrastive (pipeline.chat.encode_contexts).

  POST /get_reward (OpenRLHF's remote reward protocol, openrlhf/cli/serve_rm.py)
      {"query": [prompt + response text], "prompts": [prompt text], "labels": [...]}
   -> {"rewards": [...], "scores": [...], "extra_logs": {...}}
      The prompt text is scored as given (OpenRLHF's prompts already hold the chat template); the response is
      query[len(prompt):], finished when it ends with EOS. EndoRL's extension, which other servers ignore:
      "prompt_ids" / "response_ids" (the token ids as sampled, checked against the query text: re-tokenising
      decoded text does not always give back the sampled tokens) and "token_rewards": true. The server's own
      reward.form applies; pmi's x0 is this server's chat template without a question, and contrastive is refused
      (422, reward.form): it restates the prompt's chat messages, which template text does not give back.

Every refusal is a RequestError: an HTTP status, the field at fault and the fix, for that one request.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import re
from typing import Any

import numpy as np

from pipeline.chat import context_prompts, encode_contexts, encode_row, fit_to_window
from pipeline.config import ConfigError, from_dict, opt
from pipeline.data import prompt_field, text_field
from pipeline.endogenous import EndoRewardConfig

# EndoRewardConfig fields a request may not set: they tune the server's packing, not the reward.
MAX_JSON_DEPTH = 64  # nesting a request body may have (a valid request has 4 levels)
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
SERVER_SETTINGS = ("pack_tokens", "logit_chunk")
REWARD_OPTIONS = ("items", "token_rewards", "sentence_rm", "system_prompt", "reward")


@dataclasses.dataclass
class LimitsConfig:
    max_body_bytes: int = opt(1 << 20, "largest request body in bytes (413 above it)")
    max_items: int = opt(256, "most items (or queries) in one request (413 above it)")
    max_request_tokens: int = opt(16384, "most prompt + response tokens in one request, after truncation to the "
                                         "window (413 above it); at most batching.max_batch_tokens")
    request_timeout_s: float = opt(60.0, "a request not scored within this many seconds gets 503 (retry later)")


@dataclasses.dataclass
class AuthConfig:
    token_file: str = opt("", "file whose first line is the bearer token clients must send (empty: no token)")
    token_env: str = opt("", "name of an environment variable holding the bearer token (empty: no token)")


class RequestError(Exception):
    """A request that cannot be served: `status` (400, 401, 413, 422, 503), the `field` at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclasses.dataclass
class ScoreJob:
    """One request, tokenized and checked: what waits in the server's batch queue."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]
    prompt_tokens_dropped: list[int]
    response_tokens_dropped: list[int]
    reward: EndoRewardConfig
    token_rewards: bool = False
    sentence_rm: bool = False
    context_prompt_ids: list[list[list[int]]] = dataclasses.field(default_factory=list)  # per row, forms pmi, contrastive

    @functools.cached_property
    def tokens(self) -> int:  # read by the batch queue's batch_size_fn each time a request joins a batch
        extra = sum(len(c) + len(r) for row, r in zip(self.context_prompt_ids, self.response_ids) for c in row)
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)) + extra


# ------------------------------------------------------------------------------------------------ auth

def read_token(auth: AuthConfig, environ: dict) -> str:
    """The configured bearer token ('' when none is configured). Read at an entry point, never from a flag."""
    if auth.token_file and auth.token_env:
        raise ValueError("auth.token_file and auth.token_env are both set. Fix: keep one of them.")
    if auth.token_file:
        try:
            with open(auth.token_file) as fh:
                token = fh.readline().strip()
        except OSError as e:
            raise ValueError(f"auth.token_file {auth.token_file!r}: cannot read it ({e.strerror}). Fix: give a "
                             f"readable file holding the token.") from None
        if not token:
            raise ValueError(f"auth.token_file {auth.token_file!r} is empty. Fix: write the token on its first line.")
        return token
    if auth.token_env:
        token = environ.get(auth.token_env, "").strip()
        if not token:
            raise ValueError(f"auth.token_env: the environment variable {auth.token_env} is unset or empty. "
                             f"Fix: export {auth.token_env}=... before starting, or use auth.token_file.")
        return token
    return ""


def token_digest(token: str) -> str:
    """SHA-256 of the token: what the server replicas hold, so the token itself never enters Ray."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def check_authorization(header: str | None, digest: str) -> None:
    """401 unless `header` is 'Bearer <token>' with the configured token (constant-time compare)."""
    if not digest:
        return
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise RequestError(401, "Authorization", "this server needs a bearer token. Fix: send the header "
                                                 "'Authorization: Bearer <token>'.")
    if not hmac.compare_digest(token_digest(presented.strip()), digest):
        raise RequestError(401, "Authorization", "the bearer token is wrong.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ bodies

def check_declared_length(content_length: str | None, limits: LimitsConfig) -> None:
    if content_length and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise RequestError(413, "body", f"the body is {int(content_length)} bytes, over limits.max_body_bytes="
                                        f"{limits.max_body_bytes}. Fix: split it into smaller requests.")


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, brackets inside strings not counted. json.loads has no depth
    limit of its own: it recurses until Python's recursion limit, which libraries raise."""
    chars = np.frombuffer(JSON_STRING.sub('""', text).encode(), np.uint8)
    steps = np.isin(chars, (ord("["), ord("{"))).astype(np.int64) - np.isin(chars, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_json_body(body: bytes, limits: LimitsConfig) -> dict:
    """Bytes -> a JSON object: 413 over the size limit, 400 for bytes that are not UTF-8 JSON, 422 for a non-object."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, "body", f"the body is over limits.max_body_bytes={limits.max_body_bytes} bytes. "
                                        f"Fix: split it into smaller requests.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, "body", f"the body is not UTF-8: byte {body[e.start]:#04x} at offset {e.start}. "
                                        f"Fix: send JSON encoded as UTF-8.") from None
    if (depth := json_depth(text)) > MAX_JSON_DEPTH:
        raise RequestError(400, "body", f"the JSON is nested too deeply ({depth} levels, at most {MAX_JSON_DEPTH}).")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, "body", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"the body must be a JSON object, got a {type(data).__name__}.")
    return data


def _encodable(value: str, field: str) -> str:
    """JSON escapes can smuggle in lone surrogates ("\\ud800"), which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(422, field, f"{field} holds an unpaired surrogate at character {e.start}. "
                                       f"Fix: send valid Unicode text.") from None
    return value


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(422, field, f"{field} must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise RequestError(422, field, f"{field} is empty.")
    return _encodable(value, field)


def _prompt_texts(prompt: Any, field: str) -> list[tuple[str, str]]:
    """(field, text) of every string in a prompt given as a string or as chat messages."""
    if isinstance(prompt, str):
        return [(field, prompt)]
    if not isinstance(prompt, list):
        return []
    return [(f"{field}[{j}].{key}", m[key]) for j, m in enumerate(prompt) if isinstance(m, dict)
            for key in ("role", "content") if isinstance(m.get(key), str)]


def _flag(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(422, key, f"{key} must be true or false, got {value!r}.")
    return value


def _list(data: dict, key: str, limits: LimitsConfig) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise RequestError(422, key, f"{key} must be a list, got {type(value).__name__ if key in data else 'nothing'}.")
    if not value:
        raise RequestError(422, key, f"{key} is empty: nothing to score.")
    if len(value) > limits.max_items:
        raise RequestError(413, key, f"{key} has {len(value)} entries, over limits.max_items={limits.max_items}. "
                                     f"Fix: split it into smaller requests.")
    return value


def request_reward_config(defaults: EndoRewardConfig, overrides: Any, system_prompt: str | None) -> EndoRewardConfig:
    """The server's reward config with a request's `reward` overrides (any EndoRewardConfig field but the server's
    packing settings), checked like a config file: a bad value names `reward.FIELD`."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise RequestError(422, "reward", f"reward must be an object of reward options, got {type(overrides).__name__}.")
    for key in overrides:
        if key in SERVER_SETTINGS:
            raise RequestError(422, f"reward.{key}", f"reward.{key} is a server setting, not a request option.")
    if system_prompt is not None:
        if overrides.get("system_prompt", system_prompt) != system_prompt:
            raise RequestError(422, "system_prompt", "system_prompt and reward.system_prompt differ. Fix: give one.")
        overrides = {**overrides, "system_prompt": system_prompt}
    if not overrides:
        return defaults
    try:
        return from_dict(EndoRewardConfig, {**dataclasses.asdict(defaults), **overrides}, prefix="reward.")
    except (ConfigError, ValueError) as e:  # the messages name the field: "--reward.alpha: ...", "reward.alpha must..."
        field = re.search(r"reward\.\w+", str(e))
        raise RequestError(422, field.group(0) if field else "reward", str(e).lstrip("-")) from None


def encode_reward_request(data: dict, tokenizer, window: int, defaults: EndoRewardConfig, limits: LimitsConfig,
                          has_sentence_rm: bool) -> ScoreJob:
    """A /v1/reward body -> a ScoreJob, encoded as jobs.score encodes rows; any bad field stops here."""
    unknown = sorted(set(data) - set(REWARD_OPTIONS))
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field {unknown[0]!r}; known: {', '.join(REWARD_OPTIONS)}.")
    items = _list(data, "items", limits)
    token_rewards, sentence_rm = _flag(data, "token_rewards"), _flag(data, "sentence_rm")
    if sentence_rm and not has_sentence_rm:
        raise RequestError(422, "sentence_rm", "this server has no sentence RM. Fix: start it with --sentence_rm DIR.")
    system_prompt = _text(data["system_prompt"], "system_prompt", allow_empty=True) if "system_prompt" in data else None
    reward = request_reward_config(defaults, data.get("reward"), system_prompt)
    job = ScoreJob([], [], [], [], [], reward, token_rewards, sentence_rm)
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise RequestError(422, where, f"{where} must be an object with `prompt` and `response`.")
        for key in ("prompt", "response"):
            if key not in item:
                raise RequestError(422, f"{where}.{key}", f"{where} has no `{key}`.")
        for field, text in _prompt_texts(item["prompt"], f"{where}.prompt") + _prompt_texts(item["response"], f"{where}.response"):
            _encodable(text, field)
        try:
            messages = prompt_field(item, i, "items")
            response = text_field(item, "response", i, "items")
        except ValueError as e:
            key = "response" if "`response`" in str(e) else "prompt"
            raise RequestError(422, f"{where}.{key}", str(e)) from None
        try:
            p, r, finished, dropped, cut = encode_row(tokenizer, messages, response, window, reward.system_prompt,
                                                      reward.truncation, where=where)
            job.context_prompt_ids.append(encode_contexts(tokenizer, messages, r, window, reward, where))
        except ValueError as e:  # truncation policy "error": this item does not fit the window
            raise RequestError(413, where, str(e)) from None
        except Exception as e:  # the chat template refused the messages (e.g. roles out of order)
            raise RequestError(422, f"{where}.prompt", f"the model's chat template refused it: {e}") from None
        for column, value in zip(("prompt_ids", "response_ids", "finished", "prompt_tokens_dropped",
                                  "response_tokens_dropped"), (p, r, finished, dropped, cut)):
            getattr(job, column).append(value)
    check_request_tokens(job, limits)
    return job


def check_request_tokens(job: ScoreJob, limits: LimitsConfig) -> None:
    if job.tokens > limits.max_request_tokens:
        raise RequestError(413, "request", f"the request holds {job.tokens} tokens, over limits.max_request_tokens="
                                           f"{limits.max_request_tokens}. Fix: split it into smaller requests.")


# ------------------------------------------------------------------------------------------------ OpenRLHF

def _token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    if not (isinstance(value, list) and value and all(type(t) is int and 0 <= t < vocab_size for t in value)):
        raise RequestError(422, field, f"{field} must be a non-empty list of token ids in [0, {vocab_size}).")
    return value


def encode_openrlhf_request(data: dict, tokenizer, window: int, defaults: EndoRewardConfig,
                            limits: LimitsConfig) -> ScoreJob:
    """A /get_reward body -> a ScoreJob. Unknown fields are ignored, as OpenRLHF's own server ignores them."""
    queries = _list(data, "query", limits)
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != len(queries):
        raise RequestError(422, "prompts", "prompts must be a list as long as query: the endogenous reward needs the "
                                           "prompt to tell it from the response.")
    prompt_ids, response_ids = data.get("prompt_ids"), data.get("response_ids")
    if (prompt_ids is None) != (response_ids is None):
        raise RequestError(422, "response_ids" if response_ids is None else "prompt_ids",
                           "prompt_ids and response_ids come together.")
    for key, value in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
        if value is not None and (not isinstance(value, list) or len(value) != len(queries)):
            raise RequestError(422, key, f"{key} must be a list as long as query.")
    token_rewards = _flag(data, "token_rewards")
    job = ScoreJob([], [], [], [], [], defaults, token_rewards)
    try:  # pmi's x0 is this server's chat template without a question; contrastive needs messages, not template text
        contexts = context_prompts(tokenizer, None, defaults)
    except ValueError as e:
        raise RequestError(422, "reward.form", f"this server scores reward.form {defaults.form}, which /get_reward "
                                               f"cannot: {e} (POST /v1/reward takes chat messages)") from None
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        query, prompt = _text(query, f"query[{i}]"), _text(prompt, f"prompts[{i}]")
        if prompt_ids is not None:  # the tokens as sampled; the text must be theirs
            p = _token_ids(prompt_ids[i], f"prompt_ids[{i}]", vocab_size)
            r = _token_ids(response_ids[i], f"response_ids[{i}]", vocab_size)
            if tokenizer.decode(p + r, skip_special_tokens=False) != query:
                raise RequestError(422, f"prompt_ids[{i}]", f"prompt_ids[{i}] + response_ids[{i}] do not decode to "
                                                            f"query[{i}]: the client's tokenizer is not this server's "
                                                            f"model's. Fix: send text only, or serve the policy's model.")
        else:
            if not query.startswith(prompt):
                raise RequestError(422, f"query[{i}]", f"query[{i}] does not start with prompts[{i}]: the response is "
                                                       f"what follows the prompt. Fix: query = prompt + response.")
            if not query[len(prompt):]:
                raise RequestError(422, f"query[{i}]", f"query[{i}] has an empty response after prompts[{i}].")
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(query[len(prompt):], add_special_tokens=False)["input_ids"]
        finished, full_length = r[-1] == eos, len(r)  # OpenRLHF keeps the sampled EOS; a response cut by length has none
        try:
            p, r, dropped, cut = fit_to_window(p, r, window, defaults.truncation, where=f"query[{i}]")
        except ValueError as e:
            raise RequestError(413, f"query[{i}]", str(e)) from None
        for column, value in zip(("prompt_ids", "response_ids", "finished", "prompt_tokens_dropped",
                                  "response_tokens_dropped"), (p, r, finished and not cut, dropped, full_length - len(r))):
            getattr(job, column).append(value)
        try:
            job.context_prompt_ids.append([fit_to_window(c, r, window, defaults.truncation, f"query[{i}] ({defaults.form} "
                                                                                         f"context)")[0] for c in contexts])
        except ValueError as e:
            raise RequestError(413, f"query[{i}]", str(e)) from None
    check_request_tokens(job, limits)
    return job


# ------------------------------------------------------------------------------------------------ answers

@dataclasses.dataclass
class Scored:
    """A ScoreJob's results, row by row."""
    rewards: list[float]
    token_rewards: list[list[float]]
    sentence_rewards: list[float] | None = None
    sentence_token_rewards: list[list[float]] | None = None


def reward_answer(job: ScoreJob, scored: Scored) -> dict:
    items = []
    for i, reward in enumerate(scored.rewards):
        item = {"reward": reward, "prompt_tokens_dropped": job.prompt_tokens_dropped[i],
                "response_tokens_dropped": job.response_tokens_dropped[i]}
        if job.token_rewards:
            item["token_rewards"] = scored.token_rewards[i]
        if job.sentence_rm:
            item["sentence_reward"] = scored.sentence_rewards[i]
            if job.token_rewards:
                item["sentence_rewards"] = scored.sentence_token_rewards[i]
        items.append(item)
    return {"items": items}


def openrlhf_answer(job: ScoreJob, scored: Scored, use_sentence_rm: bool = False) -> dict:
    rewards = scored.sentence_rewards if use_sentence_rm else scored.rewards
    answer = {"rewards": rewards, "scores": rewards,
              "extra_logs": {"endogenous_reward": scored.rewards,
                             "prompt_tokens_dropped": [float(d) for d in job.prompt_tokens_dropped]}}
    if job.token_rewards:
        answer["token_rewards"] = scored.sentence_token_rewards if use_sentence_rm else scored.token_rewards
    return answer
