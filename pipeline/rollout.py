"""What a rollout engine computes: sampling settings, vLLM outputs -> ROLLOUT_SCHEMA rows, weight-sync checks.

No vLLM import here: these helpers take plain values and objects shaped like vLLM's `RequestOutput`
(`.outputs`, each with `.index`, `.token_ids`, `.logprobs`, `.finish_reason`, `.stop_reason`), so they run
in a test without an engine. `actors/rollout.py` hosts the engine and calls them.

Decisions (vLLM 0.32, V1 engine), each checked by a test:

- sample_logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM returns
  for a sampled token is log_softmax(logits / temperature) after top-p, i.e. under the distribution it was
  actually sampled from. The default ("raw_logprobs") is temperature 1, which would make the PPO ratio
  pi_theta / pi_old wrong by a temperature factor from the first step. With top_p = 1 (the default) this is
  exactly what the learner computes from logits / temperature. With top_p < 1 it is the renormalised nucleus
  distribution, which the learner does not reproduce: keep top_p = 1 for PPO.
- EOS: vLLM appends the sampled token before its stop check, so a response that stopped on EOS (or on a stop
  token id from the generation config) ENDS with that token, and its logprob is in `logprobs`. We keep it:
  the reward treats the EOS as the final action. If a future vLLM dropped it, `outputs_to_rollout_table`
  raises instead of inventing a log-prob for an appended token.
- Seeds: one `SamplingParams.seed` shared by every request gives every prompt's i-th sample the same noise
  (measured: samples of different prompts share most tokens). The RL loop passes `generate(..., seeds=...)`:
  one n=1 request per sample, each with its own hashed seed (pipeline/seeds.py), so a sample does not depend on
  the other prompts of its engine's shard. `seed=s` (prompt i gets s + i) is kept for direct use. Without a
  seed the engine's own generator (`LLM(seed=cfg.seed + engine_index)`) is used.
- Tied embeddings: a weight sync must carry `lm_head.weight` explicitly; see `weights_for_sync`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from pipeline.arrow import ROLLOUT_SCHEMA, context_columns, numpy_to_ragged
from pipeline.config import opt

LOGPROBS_MODE = "processed_logprobs"  # vLLM engine arg: logprobs after temperature and top-p (module docstring)


def engine_range(engines: int | str) -> tuple[int, int]:
    """rollout.engines -> (min, max): N is (N, N); "MIN..MAX" an elastic range."""
    low, dots, high = str(engines).partition("..")
    try:
        low_n, high_n = int(low), int(high if dots else low)
    except ValueError:
        low_n = high_n = 0
    if not 1 <= low_n <= high_n:
        raise ValueError(f"rollout.engines must be N >= 1 or MIN..MAX with 1 <= MIN <= MAX, got {engines!r}. "
                         f"Fix: --rollout.engines 2, or --rollout.engines 1..4")
    return low_n, high_n


@dataclasses.dataclass
class RolloutConfig:
    engines: int | str = opt(1, "vLLM engine replicas (one Ray actor each): N, or MIN..MAX (elastic: engines are added "
                                "while the cluster has room, up to MAX, and a lost one is dropped while MIN remain)")
    n_samples: int = opt(4, "responses sampled per prompt (adjacent rows in the rollout table)")
    temperature: float = opt(1.0, "sampling temperature; the learner divides its logits by the same value")
    top_p: float = opt(1.0, "nucleus sampling; keep 1.0 for PPO (with < 1 the old log-probs are of the truncated "
                            "distribution, which the learner does not reproduce)")
    max_new_tokens: int = opt(64, "response length limit; a response cut here has no EOS (finished = false)")
    max_prompt_tokens: int = opt(512, "longest prompt accepted (engine context = this + max_new_tokens + 1)")
    seed: int = opt(0, "engine i's own generator: LLM(seed=seed + i), used only by requests without a seed (the RL loop's per-sample seeds hash the run's --seed)")
    gpu_memory_utilization: float = opt(0.5, "fraction of GPU memory for vLLM (weights + KV cache); unused on CPU")
    cpus_per_engine: float = opt(1, "CPUs per engine actor; on CPU the engine's OpenMP threads bind to as many cores")
    gpus_per_engine: float = opt(0, "GPUs per engine actor (0 with --model.device cuda = 1)")
    resources: dict[str, float] = opt(help="custom Ray resources each engine needs, e.g. '{gpu8_node: 1}' to pin the "
                                           "engines to a node type that advertises it", factory=dict)
    enforce_eager: bool = opt(True, "no CUDA graphs / compilation: faster start, slower decode on GPU")

    def __post_init__(self):
        self.min_engines, self.max_engines = engine_range(self.engines)
        checks = [
            (self.n_samples >= 1, "n_samples", "must be >= 1", "--rollout.n_samples 4"),
            (self.temperature > 0, "temperature", "must be > 0 (greedy decoding has no usable log-probs for PPO)",
             "--rollout.temperature 1.0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]", "--rollout.top_p 1.0"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", "--rollout.max_new_tokens 64"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1", "--rollout.max_prompt_tokens 512"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]",
             "--rollout.gpu_memory_utilization 0.5"),
            (self.cpus_per_engine > 0, "cpus_per_engine", "must be > 0", "--rollout.cpus_per_engine 1"),
            (self.gpus_per_engine >= 0, "gpus_per_engine", "must be >= 0", "--rollout.gpus_per_engine 1"),
        ]
        for ok, name, rule, fix in checks:
            if not ok:
                raise ValueError(f"rollout.{name} {rule}, got {getattr(self, name)!r}. Fix: {fix}")

    @property
    def elastic(self) -> bool:
        return self.max_engines > self.min_engines

    def check_fits(self, window: int) -> None:
        """Stop a job whose longest prompt + response cannot fit the model's window."""
        if self.max_model_len > window:
            raise SystemExit(f"rollout.max_prompt_tokens + rollout.max_new_tokens = {self.max_model_len - 1} is over "
                             f"the model's window of {window} tokens. Fix: lower one of them.")

    @property
    def max_model_len(self) -> int:
        """Engine context: the longest prompt + response, +1 because vLLM must be able to produce one more
        token (token_logprobs asks for one after a full-length prompt + response)."""
        return self.max_prompt_tokens + self.max_new_tokens + 1


def sampling_params_kwargs(cfg: RolloutConfig, n_samples: int | None = None, seed: int | None = None) -> dict:
    """Keyword arguments of vLLM `SamplingParams` for a rollout request.

    `seed` must differ per request (the RL loop passes one hashed seed per sample, pipeline/seeds.py): one seed shared by all
    requests gives every prompt's i-th sample the same noise. Per-request seeds make a step's rollouts a
    function of (weights, step), which is what lets a resumed run reproduce the next step.
    """
    return dict(n=n_samples or cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens, seed=seed,
                logprobs=0,  # 0 = only the sampled token's log-prob
                detokenize=False)  # token ids are all we need


def outputs_to_rollout_table(prompt_ids_per_prompt: list, prompt_id_list: list[str], request_outputs: list,
                             eos_token_id: int, contexts: list | None = None) -> pa.Table:
    """vLLM RequestOutputs (one per prompt, in prompt order) -> a ROLLOUT_SCHEMA table.

    Row order: prompt by prompt, and a prompt's n samples adjacent in sample-index order.
    finished = the response stopped on a token (EOS, or a generation-config stop token id) and ends with it.
    `contexts` (one entry per prompt: its extra contexts for reward forms pmi, contrastive) is copied onto each of
    the prompt's samples as CONTEXT_COLUMN, for the scorer.
    """
    if not len(prompt_ids_per_prompt) == len(prompt_id_list) == len(request_outputs):
        raise ValueError(f"got {len(prompt_ids_per_prompt)} prompts, {len(prompt_id_list)} prompt ids and "
                         f"{len(request_outputs)} outputs; they must be equal (one output per prompt, in order)")
    rows = {name: [] for name in ROLLOUT_SCHEMA.names}
    sample_contexts = []
    for p, (prompt_ids, prompt_id, request_output) in enumerate(zip(prompt_ids_per_prompt, prompt_id_list, request_outputs)):
        for sample in sorted(request_output.outputs, key=lambda s: s.index):
            sample_contexts.append(contexts[p] if contexts is not None else [])
            response_ids = list(sample.token_ids)
            if sample.logprobs is None or len(sample.logprobs) != len(response_ids):
                raise ValueError(f"prompt {prompt_id!r}: sampled-token log-probs missing; request them with "
                                 f"SamplingParams(logprobs=0) (see sampling_params_kwargs)")
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, response_ids)]
            finished = sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str)
            if finished:
                stop_token = eos_token_id if sample.stop_reason is None else sample.stop_reason
                if not response_ids or response_ids[-1] != stop_token:
                    raise RuntimeError(f"prompt {prompt_id!r}: vLLM stopped on token {stop_token} but the response "
                                       f"does not end with it; the reward needs the EOS as the final action")
            elif sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {prompt_id!r}: vLLM finish_reason {sample.finish_reason!r} "
                                   f"(expected 'stop' or 'length')")
            rows["prompt_id"].append(prompt_id)
            rows["prompt_ids"].append(np.asarray(prompt_ids))
            rows["response_ids"].append(np.asarray(response_ids))
            rows["sample_logprobs"].append(np.asarray(logprobs))
            rows["finish_reason"].append(sample.finish_reason)
            rows["finished"].append(finished)
    columns = [pa.array(rows["prompt_id"], pa.string()),
               numpy_to_ragged(rows["prompt_ids"], pa.int32()),
               numpy_to_ragged(rows["response_ids"], pa.int32()),
               numpy_to_ragged(rows["sample_logprobs"], pa.float32()),
               pa.array(rows["finish_reason"], pa.string()),
               pa.array(rows["finished"], pa.bool_())]
    table = pa.Table.from_arrays(columns, schema=ROLLOUT_SCHEMA)
    for name, column in context_columns(sample_contexts).items():
        table = table.append_column(name, column)
    return table


def prompt_logprobs_to_numpy(prompt_logprobs: list, sequence: list[int], start: int) -> np.ndarray:
    """Log-probs of `sequence[start:]` from vLLM `prompt_logprobs` (entry t: {sequence[t]: Logprob}, t >= 1)."""
    return np.asarray([prompt_logprobs[t][sequence[t]].logprob for t in range(start, len(sequence))], np.float32)


def weights_for_sync(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for vLLM `reload_weights(weights_iterator=...)`.

    Tied embeddings (measured, vLLM 0.32 on CPU): a reload rebuilds a layer's kernel state (for the lm_head on
    CPU, the oneDNN matmul handle built from the weight) only when that layer itself receives weights. A state dict
    without `lm_head.weight` (named_parameters(), e.g. gathered under DeepSpeed ZeRO-3, or a safetensors file:
    both list a tied weight once) silently leaves the OLD output head. So for a tied model we always send
    `lm_head.weight` = the new input embedding, whatever the caller's dict holds under that name.
    """
    items = [(name, tensor) for name, tensor in state.items() if not (tie_word_embeddings and name == "lm_head.weight")]
    if tie_word_embeddings:
        embeddings = [tensor for name, tensor in state.items() if name.endswith("embed_tokens.weight")]
        if len(embeddings) != 1:
            raise ValueError(f"tied embeddings: expected one '*embed_tokens.weight' in the state dict, found "
                             f"{len(embeddings)}; send the full model state dict (Hugging Face names)")
        items.append(("lm_head.weight", embeddings[0]))
    return items


def tied_head_stream(items, tie_word_embeddings: bool):
    """(name, tensor) pairs as they arrive -> the same for vLLM, with `lm_head.weight` = the input embedding for a
    tied model (weights_for_sync's rule, for a stream: the learner's named_parameters list a tied weight once)."""
    for name, tensor in items:
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        yield name, tensor
        if tie_word_embeddings and name.endswith("embed_tokens.weight"):
            yield "lm_head.weight", tensor


def logprob_parity(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Max |a - b| over all tokens of all rows: the driver's check that a weight sync reached the engine."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("logprob_parity: the two sides must have the same rows and row lengths")
    diffs = [np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) for x, y in zip(a, b) if len(x)]
    worst = float(max(diffs, default=0.0))
    return worst if np.isfinite(worst) and not any(np.isnan(diffs)) else float("inf")  # NaN must fail a `< tol` check


def prompt_probe(prompt_ids: list[np.ndarray], rows: int = 2, tail: int = 4) -> pa.Table:
    """A parity probe (prompt_ids, response_ids) when no batch was sampled yet: the first `rows` prompts of more
    than one token, their last `tail` tokens as the 'response' (the probe compares two models' log-probs of the same
    tokens, so any tokens do)."""
    chosen = [np.asarray(p) for p in prompt_ids if len(p) > 1][:rows]
    cut = [len(p) - min(tail, len(p) - 1) for p in chosen]
    return pa.table({"prompt_ids": numpy_to_ragged([p[:c] for p, c in zip(chosen, cut)], pa.int32()),
                     "response_ids": numpy_to_ragged([p[c:] for p, c in zip(chosen, cut)], pa.int32())})
