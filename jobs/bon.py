"""Best-of-N sampling: N responses per prompt from the model, scored by a reward source; keep the best.

    python -m jobs.bon --prompts builtin --n 8 --reward endogenous --output outputs/bon.jsonl
    python -m jobs.bon --prompts prompts.jsonl --n 8 --reward sentence_rm --rm_path runs/sentence_rm
    python -m jobs.bon --reward both --rm_path runs/sentence_rm --endogenous_weight 1 --sentence_rm_weight 0.5

Sources: `endogenous` (the response reward of the frozen model itself, --endogenous.*), `sentence_rm` (R of a
trained sentence-level RM) or `both` (endogenous_weight * endogenous + sentence_rm_weight * R).
vLLM engines sample (prompt i of the run with seed + i, so a run is reproducible whatever the batching);
each source's actor scores the same samples. Writes one JSON line per prompt, in prompt order:

    prompt_id, prompt, response (the best candidate's text), score, best_index, finished,
    candidates (the N texts), scores (their N scores), candidates_finished,
    endogenous_scores / sentence_rm_scores (each source's N scores, when that source ran)

Ties go to the lowest candidate index. Results stream into OUTPUT.partial, renamed when complete.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import yaml
from tqdm import tqdm

from actors.cluster import RayConfig, check_driver_device, init_ray, is_local
from actors.placement import PlacementConfig, bundle, gpus_for, in_bundle, reserve
from jobs.score import OutputWriter
from pipeline.arrow import ragged_to_numpy
from pipeline.config import from_dict, opt, parse_config, to_yaml
from pipeline.data import load_prompts
from pipeline.driver import tokenize_prompts
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import ModelConfig, open_model
from pipeline.precision import DType, summarize
from pipeline.storage import check_location
from pipeline.rollout import RolloutConfig
from pipeline.sentence_rm import CONFIG_FILE, RewardModelConfig

SOURCES = {"endogenous": ["endogenous"], "sentence_rm": ["sentence_rm"], "both": ["endogenous", "sentence_rm"]}
SCORE_COLUMNS = {"endogenous": "reward", "sentence_rm": "sentence_reward"}  # what each scorer appends


@dataclasses.dataclass
class BoNConfig:
    local: bool = opt(False, "local debug mode: an embedded single-node Ray, even if RAY_ADDRESS is set")
    prompts: str = opt("builtin", "'builtin', or a prompts/pairs file (.jsonl/.parquet/.json) or HF dataset name")
    max_prompts: int = opt(0, "use only the first N prompts (0 = all)")
    n: int = opt(8, "candidates sampled per prompt (sets rollout.n_samples)")
    reward: Literal["endogenous", "sentence_rm", "both"] = opt("endogenous", "which reward picks the best candidate")
    rm_path: str = opt("", "trained sentence RM folder (written by save_reward_model); needed by sentence_rm and both")
    splitter: str = opt("", "sentence splitter for the RM; empty = the one it was trained with")
    endogenous_weight: float = opt(1.0, "--reward both: weight of the endogenous response reward")
    sentence_rm_weight: float = opt(1.0, "--reward both: weight of the sentence RM's response score R")
    output: str = opt("outputs/bon.jsonl", "where to write one row per prompt (.jsonl, or .parquet)")
    prompts_per_batch: int = opt(8, "prompts sampled and scored together (one progress-bar step)")
    seed: int = opt(0, "prompt i of the run is sampled with seed + i")
    rollout_dtype: DType = opt("auto", "vLLM engine precision; auto: bfloat16 on a GPU or a CPU with avx512_bf16/"
                                       "amx_bf16, else float32, resolved on each engine's node (fp16: not on CPU)")
    scorer_cpus: float = opt(1, "CPUs per scoring actor (one per reward source)")
    scorer_gpus: float = opt(0, "GPUs per scoring actor (0 with --model.device cuda = 1)")
    model: ModelConfig = opt(factory=ModelConfig)
    endogenous: EndoRewardConfig = opt(factory=EndoRewardConfig)
    rollout: RolloutConfig = opt(factory=RolloutConfig)
    placement: PlacementConfig = opt(factory=PlacementConfig)
    ray: RayConfig = opt(factory=RayConfig)


def check_config(cfg: BoNConfig) -> None:
    """Refusals that need no data: each names the flag and the fix."""
    if cfg.n < 1:
        raise SystemExit(f"--n must be >= 1, got {cfg.n}. Fix: --n 8")
    if cfg.prompts_per_batch < 1:
        raise SystemExit(f"--prompts_per_batch must be >= 1, got {cfg.prompts_per_batch}. Fix: --prompts_per_batch 8")
    if cfg.max_prompts < 0:
        raise SystemExit(f"--max_prompts must be >= 0 (0 = all), got {cfg.max_prompts}.")
    check_driver_device(cfg.ray, cfg.model.device)
    try:  # the driver writes the output; on a cluster a relative path is the job's temporary working directory
        check_location(cfg.output, "--output", cluster=not is_local(cfg.ray))
    except ValueError as e:
        raise SystemExit(str(e))
    if "sentence_rm" in SOURCES[cfg.reward]:
        check_rm_path(cfg.rm_path, cfg.reward)


def check_rm_path(path: str, reward: str) -> None:
    if not path:
        raise SystemExit(f"--reward {reward} needs --rm_path DIR: a trained sentence RM (written by save_reward_model).")
    config_file = os.path.join(os.path.expanduser(path), CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise SystemExit(f"--rm_path {path!r}: no trained reward model there ({CONFIG_FILE} not found). Fix: point it "
                         f"at the folder a reward-model training run wrote.")
    with open(config_file) as fh:
        kind = from_dict(RewardModelConfig, yaml.safe_load(fh) or {}).kind
    if kind != "sentence":
        raise SystemExit(f"--rm_path {path!r} holds a {kind!r} reward model; best-of-N with sentence_rm needs a "
                         f"sentence-level one (kind: sentence).")


def generate(engines: list, prompts: pa.Table, n: int, seed: int) -> list:
    """Contiguous shards of the prompts across engines; shard rows keep their run-wide seeds (seed + index)."""
    shards = np.array_split(np.arange(prompts.num_rows), len(engines))
    return [engine.generate.remote(prompts.take(idx), n_samples=n, seed=seed + int(idx[0]))
            for engine, idx in zip(engines, shards) if len(idx)]


def score_rollouts(scorers: dict, rollout_refs: list) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The rollout rows (in order) and each source's response score per row."""
    calls = {source: [actor.score.remote(ref) for ref in rollout_refs] for source, actor in scorers.items()}
    rollout = pa.concat_tables(ray.get(rollout_refs))
    scores = {source: np.concatenate([t[SCORE_COLUMNS[source]].to_numpy() for t in ray.get(refs)]).astype(np.float64)
              for source, refs in calls.items()}
    return rollout, scores


def best_rows(rollout: pa.Table, scores: dict[str, np.ndarray], weights: dict[str, float], n: int,
              messages: list, tokenizer) -> list[dict]:
    """One output row per prompt from a rollout of n adjacent samples per prompt; score = sum_s weight_s * score_s."""
    total = sum(weights[source] * values for source, values in scores.items())
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in ragged_to_numpy(rollout["response_ids"])]
    finished = rollout["finished"].to_pylist()
    prompt_ids = rollout["prompt_id"].to_pylist()
    rows = []
    for p, prompt in enumerate(messages):
        group = slice(p * n, (p + 1) * n)
        best = int(np.argmax(total[group]))  # first maximum: ties go to the lowest index
        row = {"prompt_id": prompt_ids[p * n], "prompt": prompt, "response": texts[group][best],
               "score": float(total[group][best]), "best_index": best, "finished": finished[group][best],
               "candidates": texts[group], "scores": [float(s) for s in total[group]],
               "candidates_finished": finished[group]}
        for source, values in scores.items():
            row[f"{source}_scores"] = [float(s) for s in values[group]]
        rows.append(row)
    return rows


def best_of_n(cfg: BoNConfig) -> str:
    check_config(cfg)
    cfg.rollout.n_samples = cfg.n
    try:
        prompts = load_prompts(cfg.prompts)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--prompts: {e}")
    if cfg.max_prompts:
        prompts = prompts.slice(0, cfg.max_prompts)
    if prompts.num_rows == 0:
        raise SystemExit(f"--prompts {cfg.prompts!r} gave zero prompts. Fix: point it at a file with a `prompt` column.")
    _, tokenizer, window = open_model(cfg.model)
    cfg.rollout.check_fits(window)
    try:
        prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.endogenous, cfg.rollout.max_prompt_tokens)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}")
    writer = OutputWriter(cfg.output)  # refuses an unknown file type before any actor starts
    messages = prompts["prompt"].to_pylist()
    weights = {"endogenous": cfg.endogenous_weight if cfg.reward == "both" else 1.0,
               "sentence_rm": cfg.sentence_rm_weight if cfg.reward == "both" else 1.0}

    if cfg.rollout.elastic:
        raise SystemExit(f"--rollout.engines {cfg.rollout.engines}: a range is for RL runs (jobs.rlhf); best-of-n "
                         f"takes a fixed count. Fix: --rollout.engines {cfg.rollout.max_engines}")
    init_ray(cfg.ray, cfg.model.device)
    from actors.base_model import BaseModelActor  # imported once the config is known good
    from actors.rollout import start_rollout_engines
    from actors.sentence_rm import SentenceRMActor

    try:
        engines, engine_group = start_rollout_engines(cfg.model.name, cfg.rollout_dtype, cfg.model.device, cfg.rollout,
                                                      cfg.ray, cfg.placement, cfg.model.cache_dir)
        request = bundle(cfg.scorer_cpus, gpus_for(cfg.model.device, cfg.scorer_gpus))
        scorer_group = reserve("scorers", [request] * len(SOURCES[cfg.reward]), "SPREAD", cfg.placement)
    except RuntimeError as e:
        raise SystemExit(f"could not start the actors: {e}")
    scorer_options = [dict(num_cpus=request["CPU"], num_gpus=request.get("GPU", 0), scheduling_strategy=in_bundle(scorer_group, i))
                      for i in range(len(SOURCES[cfg.reward]))]
    scorers = {}
    if "endogenous" in SOURCES[cfg.reward]:
        scorers["endogenous"] = BaseModelActor.options(**scorer_options.pop()).remote(cfg.model, cfg.endogenous)
    if "sentence_rm" in SOURCES[cfg.reward]:
        scorers["sentence_rm"] = SentenceRMActor.options(**scorer_options.pop()).remote(
            cfg.rm_path, cfg.model.device, cfg.splitter or None)
    try:
        print(f"starting {len(engines)} rollout engine(s) and scorers: {', '.join(scorers)}")
        ray.get([actor.__ray_ready__.remote() for actor in engines + list(scorers.values())])
        print(f"rollout engines: {summarize(ray.get([engine.precision.remote() for engine in engines]))}", flush=True)
        with tqdm(total=prompt_ids.num_rows, desc=f"best-of-{cfg.n} ({cfg.reward})", unit="prompt") as bar:
            for first in range(0, prompt_ids.num_rows, cfg.prompts_per_batch):
                batch = prompt_ids.slice(first, cfg.prompts_per_batch)
                rollout, scores = score_rollouts(scorers, generate(engines, batch, cfg.n, cfg.seed + first))
                writer.write(best_rows(rollout, scores, weights, cfg.n, messages[first:first + batch.num_rows], tokenizer))
                bar.update(batch.num_rows)
        writer.close()
    finally:
        for actor in engines + list(scorers.values()):
            ray.kill(actor)
        for group in (engine_group, scorer_group):
            ray.util.remove_placement_group(group)
    print(f"best-of-{cfg.n} for {prompt_ids.num_rows} prompts ({cfg.reward}) -> {cfg.output}")
    return cfg.output


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(BoNConfig, argv, __doc__)
    if cfg.local:
        cfg.ray.address = "local"
    print(to_yaml(cfg))
    return best_of_n(cfg)


if __name__ == "__main__":
    main()
