"""Batch scoring with the endogenous reward.

    python -m jobs.score --input rows.jsonl --output scored.parquet [--model NAME_OR_PATH]

Input rows (.jsonl or .parquet) need `prompt` (a string or a list of {role, content} chat messages) and
`response`. The output (.parquet or .jsonl, by extension) keeps every input column and the row order and adds
`reward` (response-level endogenous reward), `token_rewards` (one float per response token, the last one
for EOS) and `prompt_tokens_dropped` (prompt tokens cut to fit the model's window; 0 almost always).
Rows are checked before any scoring; results stream into OUTPUT.partial and are renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from actors.base_model import EndogenousScorer, ScoringConfig, map_with_actor_pool, wait_for_replica_room
from actors.cluster import RayConfig, check_driver_device, init_ray, is_local
from actors.placement import PlacementConfig
from pipeline.arrow import context_columns, request_table
from pipeline.chat import encode_contexts, encode_row
from pipeline.config import opt, parse_config, to_yaml
from pipeline.data import prompt_field, read_records, require_columns, text_field
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import ModelConfig, open_model
from pipeline.storage import check_location


@dataclasses.dataclass
class ScoreConfig:
    input: str = opt("", "rows to score: .jsonl or .parquet with `prompt` and `response`")
    output: str = opt("", "where to write: .parquet or .jsonl")
    model: str = opt("smollm2-135m-instruct", "shorthand for --base.name: HF id, local folder or bundled model")
    base: ModelConfig = opt(factory=ModelConfig)
    reward: EndoRewardConfig = opt(factory=EndoRewardConfig)
    scoring: ScoringConfig = opt(factory=ScoringConfig)
    placement: PlacementConfig = opt(factory=PlacementConfig)
    ray: RayConfig = opt(factory=RayConfig)


def read_and_check(path: str) -> tuple[list[dict], list[list[dict]], list[str]]:
    """Input rows, their prompts as chat messages and their responses; any bad row stops here, before work."""
    try:
        rows = read_records(path)
        require_columns(rows, ["prompt", "response"], path)
        messages = [prompt_field(row, i, path) for i, row in enumerate(rows)]
        responses = [text_field(row, "response", i, path) for i, row in enumerate(rows)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--input: {e}")
    return rows, messages, responses


class OutputWriter:
    """Appends scored batches to OUTPUT.partial (parquet or jsonl); `close` renames it to OUTPUT."""

    def __init__(self, path: str):
        if not path.endswith((".parquet", ".jsonl")):
            raise SystemExit(f"--output {path!r}: unknown file type. Fix: end it with .parquet or .jsonl.")
        self.path, self.partial = path, path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.parquet, self.jsonl = None, None

    def write(self, rows: list[dict]) -> None:
        if self.path.endswith(".parquet"):
            table = pa.Table.from_pylist(rows, schema=self.parquet.schema if self.parquet else None)
            self.parquet = self.parquet or pq.ParquetWriter(self.partial, table.schema)
            self.parquet.write_table(table)
        else:
            self.jsonl = self.jsonl or open(self.partial, "w")
            for row in rows:
                self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        (self.parquet or self.jsonl).close()
        os.replace(self.partial, self.path)


def score_file(cfg: ScoreConfig) -> str:
    cfg.base.name = cfg.model
    check_driver_device(cfg.ray, cfg.base.device, "--base.device")
    try:  # the driver writes the output; on a cluster a relative path is the job's temporary working directory
        check_location(cfg.output, "--output", cluster=not is_local(cfg.ray))
    except ValueError as e:
        raise SystemExit(str(e))
    rows, messages, responses = read_and_check(cfg.input)  # read here, on the driver, and shipped as data
    if cfg.output.endswith(".parquet") and len({type(row["prompt"]) for row in rows}) > 1:
        rows = [dict(row, prompt=m) for row, m in zip(rows, messages)]  # a parquet column holds one type
    writer = OutputWriter(cfg.output)
    _, tokenizer, window = open_model(cfg.base, flag="--model")
    prompt_ids, response_ids, finished, dropped, contexts = [], [], [], [], []
    for i, (m, r) in enumerate(zip(messages, responses)):
        try:
            p, resp, done, n_dropped, _ = encode_row(tokenizer, m, r, window, cfg.reward.system_prompt,
                                                     cfg.reward.truncation, where=f"row {i}")
            contexts.append(encode_contexts(tokenizer, m, resp, window, cfg.reward, where=f"row {i}"))  # pmi, contrastive
        except ValueError as e:
            raise SystemExit(f"--input: {e}")
        prompt_ids.append(p)
        response_ids.append(resp)
        finished.append(done)  # a response cut to fit the window lost its EOS: scored as unfinished
        dropped.append(n_dropped)
    requests = request_table(prompt_ids, response_ids, finished, row_index=pa.array(range(len(rows))),
                             **context_columns(contexts))
    init_ray(cfg.ray, cfg.base.device)
    wait_for_replica_room(cfg.base, cfg.scoring, cfg.placement)
    with tqdm(total=len(rows), desc="scoring", unit="row") as bar:
        for batch in map_with_actor_pool(requests, EndogenousScorer, cfg.base, cfg.reward, cfg.scoring):
            scored = [dict(rows[i], reward=reward, token_rewards=token_rewards, prompt_tokens_dropped=dropped[i])
                      for i, reward, token_rewards in zip(batch["row_index"].to_pylist(), batch["reward"].to_pylist(),
                                                           batch["token_rewards"].to_pylist())]
            writer.write(scored)
            bar.update(batch.num_rows)
    writer.close()
    print(f"scored {len(rows)} rows ({sum(d > 0 for d in dropped)} prompts truncated to the window) -> {cfg.output}")
    return cfg.output


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(ScoreConfig, argv, __doc__)
    if not cfg.input or not cfg.output:
        raise SystemExit("--input and --output are required (see --help).")
    print(to_yaml(cfg))
    return score_file(cfg)


if __name__ == "__main__":
    main()
