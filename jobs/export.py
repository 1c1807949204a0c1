"""The trained policy of a jobs.rlhf run as a Hugging Face model folder (transformers and vLLM load it as is).

    python -m jobs.export RUN_DIR                       # newest complete checkpoint -> RUN_DIR/final_policy
    python -m jobs.export RUN_DIR --step 8              # that checkpoint -> RUN_DIR/export_step_8
    python -m jobs.export RUN_DIR --output DIR --dtype bfloat16 --overwrite

RUN_DIR is the run's --storage (a folder or an s3:// / gs:// URI). The policy's DeepSpeed ZeRO shards are merged on
CPU into its float32 weights, loaded into the base model named by the run's config.yaml, and saved with
save_pretrained (safetensors) with the tokenizer (chat template included) and a generation config. jobs.rlhf does
the same at the end of a run (--export, default on). See pipeline/export.py.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.config import opt, parse_config, to_yaml
from pipeline.export import ExportError, export_policy


@dataclasses.dataclass
class ExportConfig:
    run_dir: str = opt("", "the run's folder (jobs.rlhf --storage); also the first positional argument")
    step: int = opt(-1, "the checkpoint step to export; -1 = the newest complete checkpoint")
    output: str = opt("", "where to write the model folder; empty = RUN_DIR/final_policy (newest checkpoint) or "
                          "RUN_DIR/export_step_N (--step N)")
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "weights' dtype on disk; auto = the compute dtype the "
                                                                 "run's policy learners resolved (precision.json)")
    overwrite: bool = opt(False, "replace a non-empty --output (else refused)")


def main(argv: list[str] | None = None) -> str:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # python -m jobs.export RUN_DIR [--flags]
        argv = ["--run_dir", argv[0], *argv[1:]]
    cfg = parse_config(ExportConfig, argv, __doc__)
    print(to_yaml(cfg))
    if not cfg.run_dir:
        raise SystemExit("--run_dir is empty. Fix: python -m jobs.export RUN_DIR (the --storage of a jobs.rlhf run).")
    if cfg.step < -1:
        raise SystemExit(f"--step {cfg.step}: a checkpoint step is >= 0. Fix: --step N of a checkpoint, or leave it out.")
    try:
        output = export_policy(cfg.run_dir, None if cfg.step == -1 else cfg.step, cfg.output, cfg.dtype, cfg.overwrite)
    except ExportError as e:
        raise SystemExit(f"jobs.export: {e}")
    print(f"wrote {output}: load it with transformers' AutoModelForCausalLM.from_pretrained, or `vllm serve {output}`")
    return output


if __name__ == "__main__":
    main()
