"""Pairwise preference accuracy of reward sources on a preference-pairs data set.

    python -m jobs.eval_rewards --data ../shared/data/hh_harmless_base_test.jsonl [--format hh] [--output DIR]

Sources: the endogenous reward (--forms: sum, per-token mean, centered, pmi, contrastive), an LLM-as-a-judge baseline with the same model
(both orders), and the longer-wins / shorter-wins baselines. Next to accuracy per subset and overall: accuracy on
pairs whose chosen answer is longer, on those where it is shorter, and their mean (length-controlled). Prints a table; writes results.json and results.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from actors.base_model import (EndogenousScorer, JudgeScorer, ScoringConfig, map_with_actor_pool,
                               wait_for_replica_room)
from actors.cluster import RayConfig, check_driver_device, init_ray, is_local
from actors.placement import PlacementConfig
from pipeline.arrow import context_columns, request_table
from pipeline.chat import encode_contexts, encode_prompt, encode_response, fit_to_window
from pipeline.config import opt, parse_config, to_dict, to_yaml
from pipeline.data import load_preference_data
from pipeline.endogenous import CONTEXTS, EndoRewardConfig
from pipeline.evaluation import accuracy_table, markdown_table
from pipeline.judge import judge_prompt_ids
from pipeline.models import ModelConfig, open_model
from pipeline.storage import check_location


FORMS = ("sum", "mean", "centered", "pmi", "contrastive")
PASS_FORMS = ("centered", "pmi", "contrastive")  # each its own scoring pass, --reward.form FORM summed


@dataclasses.dataclass
class EvalConfig:
    data: str = opt("", "preference pairs: .jsonl/.parquet/.json files (comma-separated), an LLMBar folder, or a HF dataset")
    format: Literal["auto", "hh", "llmbar", "pairs", "hf"] = opt("auto", "how to read --data")
    output: str = opt("outputs/eval_rewards", "folder for results.json and results.md")
    max_pairs: int = opt(0, "evaluate only the first N pairs (0 = all)")
    forms: str = opt("sum,mean", "endogenous reward forms, comma-separated: sum, mean (both from one pass), centered, "
                                 "pmi, contrastive (each its own pass, --reward.form FORM summed)")
    judge: bool = opt(True, "also run the LLM-as-a-judge baseline with the same model")
    model: ModelConfig = opt(factory=ModelConfig)
    reward: EndoRewardConfig = opt(factory=EndoRewardConfig)
    scoring: ScoringConfig = opt(factory=ScoringConfig)
    placement: PlacementConfig = opt(factory=PlacementConfig)
    ray: RayConfig = opt(factory=RayConfig)



def encode_pairs(pairs: pa.Table, tokenizer, window: int, reward_cfg: EndoRewardConfig) -> tuple[pa.Table, int]:
    """Two score requests per pair, chosen then rejected, with the extra contexts of reward_cfg.form (pmi,
    contrastive); returns the table and the number of truncated rows."""
    prompts, responses, contexts, truncated = [], [], [], 0
    for i, (messages, chosen, rejected) in enumerate(zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(),
                                                         pairs["rejected"].to_pylist())):
        prompt_ids = encode_prompt(tokenizer, messages, reward_cfg.system_prompt)
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            where = f"pair {pairs['pair_id'][i]} ({side})"
            p, r, dropped, cut = fit_to_window(prompt_ids, encode_response(tokenizer, text), window,
                                               reward_cfg.truncation, where=where)
            truncated += bool(dropped or cut)
            prompts.append(p)
            responses.append(r)
            contexts.append(encode_contexts(tokenizer, messages, r, window, reward_cfg, where))
    return request_table(prompts, responses, [True] * len(prompts), **context_columns(contexts)), truncated


def judge_requests(pairs: pa.Table, tokenizer, reward_cfg: EndoRewardConfig) -> pa.Table:
    """Two judge prompts per pair: chosen shown as A, then chosen shown as B."""
    prompts = []
    for messages, chosen, rejected in zip(pairs["prompt"].to_pylist(), pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()):
        prompts.append(judge_prompt_ids(tokenizer, messages, chosen, rejected))
        prompts.append(judge_prompt_ids(tokenizer, messages, rejected, chosen))
    return request_table(prompts, [[] for _ in prompts], [True] * len(prompts))


def run_pool(table: pa.Table, scorer_cls, cfg: EvalConfig, column: str, desc: str, reward: EndoRewardConfig | None = None) -> list:
    values = []
    with tqdm(total=table.num_rows, desc=desc, unit="row") as bar:
        for batch in map_with_actor_pool(table, scorer_cls, cfg.model, reward or cfg.reward, cfg.scoring):
            values += batch[column].to_pylist()
            bar.update(batch.num_rows)
    return values


def evaluate(cfg: EvalConfig) -> dict:
    check_driver_device(cfg.ray, cfg.model.device)
    forms = [f.strip() for f in cfg.forms.split(",") if f.strip()]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        raise SystemExit(f"--forms {cfg.forms!r}: unknown form(s) {unknown}. Fix: a comma-separated subset of {','.join(FORMS)}")
    try:  # the reward config of each form's own pass (contrastive: its principles are checked here)
        form_cfgs = {form: dataclasses.replace(cfg.reward, form=form) for form in PASS_FORMS if form in forms}
    except ValueError as e:
        raise SystemExit(f"--forms: {e}")
    try:  # the driver writes the results; on a cluster a relative path is the job's temporary working directory
        check_location(cfg.output, "--output", cluster=not is_local(cfg.ray))
    except ValueError as e:
        raise SystemExit(str(e))
    loaded = [load_preference_data(source, cfg.format) for source in cfg.data.split(",")]
    pairs, skipped = pa.concat_tables([t for t, _ in loaded]), [line for _, lines in loaded for line in lines]
    if cfg.max_pairs:
        pairs = pairs.slice(0, cfg.max_pairs)
    if pairs.num_rows == 0:
        raise SystemExit(f"--data {cfg.data!r} holds no usable pairs ({len(skipped)} skipped). Fix: check the file and --format.")
    for line in skipped:
        print(f"skipped: {line}")
    _, tokenizer, window = open_model(cfg.model)
    try:
        requests, truncated = encode_pairs(pairs, tokenizer, window, cfg.reward)
        form_requests = {form: encode_pairs(pairs, tokenizer, window, form_cfg)[0] if form in CONTEXTS else requests
                         for form, form_cfg in form_cfgs.items()}  # with each form's extra contexts
    except ValueError as e:
        raise SystemExit(f"--data: {e}")

    init_ray(cfg.ray, cfg.model.device)
    wait_for_replica_room(cfg.model, cfg.scoring, cfg.placement)
    token_rewards = run_pool(requests, EndogenousScorer, cfg, "token_rewards", "endogenous reward")
    totals = np.array([np.sum(r, dtype=np.float64) for r in token_rewards])
    lengths = np.array([len(r) for r in token_rewards], dtype=np.float64)
    scores = {}
    if "sum" in forms:
        scores["endogenous (sum)"] = (totals[0::2], totals[1::2])
    if "mean" in forms:
        scores["endogenous (per-token mean)"] = (totals[0::2] / lengths[0::2], totals[1::2] / lengths[1::2])
    for form, form_cfg in form_cfgs.items():
        # centered: sum_h alpha*(log pi(a_h|s_h) + H(pi(.|s_h))); pmi: alpha*(log pi(y|x) - log pi(y|x0));
        # contrastive: alpha*(log pi(y|x+principle) - log pi(y|x+anti))
        c = np.array([np.sum(r, dtype=np.float64) for r in run_pool(form_requests[form], EndogenousScorer, cfg,
                                                                   "token_rewards", f"{form} reward", form_cfg)])
        scores[f"endogenous ({form})"] = (c[0::2], c[1::2])
    scores["longer wins"] = (lengths[0::2], lengths[1::2])
    scores["shorter wins"] = (-lengths[0::2], -lengths[1::2])
    if cfg.judge:
        margins = np.array(run_pool(judge_requests(pairs, tokenizer, cfg.reward), JudgeScorer, cfg, "judge_margin", "LLM judge"))
        chosen_margin = (margins[0::2] - margins[1::2]) / 2  # chosen as A minus chosen as B: position bias cancels
        scores["LLM-as-a-judge (both orders)"] = (chosen_margin, np.zeros_like(chosen_margin))

    subsets = np.array(pairs["subset"].to_pylist())
    table = accuracy_table(subsets, scores, lengths=(lengths[0::2], lengths[1::2]))
    counts = {s: int((subsets == s).sum()) for s in sorted(set(subsets.tolist()))}
    report = {"data": cfg.data, "model": cfg.model.name, "pairs": pairs.num_rows, "skipped": skipped,
              "truncated_rows": truncated, "counts": counts, "accuracy": table, "config": to_dict(cfg)}
    os.makedirs(cfg.output, exist_ok=True)
    with open(os.path.join(cfg.output, "results.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    markdown = markdown_table(table, counts)
    with open(os.path.join(cfg.output, "results.md"), "w") as fh:
        fh.write(f"Pairwise accuracy (%) on `{cfg.data}` with `{cfg.model.name}`; {len(skipped)} pairs skipped, "
                 f"{truncated} rows truncated to the window.\n\n{markdown}\n")
    print(markdown)
    print(f"{pairs.num_rows} pairs, {len(skipped)} skipped, {truncated} rows truncated; wrote {cfg.output}/results.json and results.md")
    return report


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv, __doc__)
    if not cfg.data:
        raise SystemExit("--data is required: a preference-pairs file or folder (see --help).")
    print(to_yaml(cfg))
    return evaluate(cfg)


if __name__ == "__main__":
    main()
