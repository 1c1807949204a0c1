"""The trained policy of a run as a Hugging Face model folder that transformers and vLLM load as they are.

    export_policy("runs/local")                    # -> runs/local/final_policy, from the newest complete checkpoint
    export_policy("runs/local", step=8)            # -> runs/local/export_step_8

From a run folder (a path or an s3:// / gs:// URI, pipeline/storage.py) and a checkpoint step (default the newest
complete one, pipeline/runlog.py: latest_checkpoint):
  1. the policy's DeepSpeed checkpoint (CHECKPOINT/policy/<tag>/) is consolidated into one full float32 state dict
     on CPU: DeepSpeed's zero_to_fp32 merges the ZeRO-1/2/3 shards of every rank (the learners keep float32
     master weights); a stage-0 checkpoint holds the whole module in its model-states file already;
  2. the state dict goes into the base model's architecture (the checkpoint's config.yaml names model.name, which
     is resolved on this node as every actor resolves it). Tied embeddings: lm_head.weight is the embedding, so it
     may be absent or must equal model.embed_tokens.weight; save_pretrained writes it once;
  3. save_pretrained (safetensors) in the chosen dtype (auto = the compute dtype the run's policy learners resolved,
     from precision.json, else the run's learner.dtype resolved here), the base tokenizer with its chat template,
     and a generation config (the base's, EOS set, sampling at the rollout temperature the policy was trained at),
     plus endorl_export.json saying where it came from.

Nothing half-written ever looks complete: the folder is written under a temporary name next to the target and
renamed into place (on object storage, where folders cannot be renamed, config.json is uploaded last: without it
neither transformers nor vLLM takes the folder for a model). An existing non-empty output is refused unless
overwrite=True.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid

import torch
import yaml

from pipeline.precision import DTYPES, resolve_dtype
from pipeline.runlog import CHECKPOINTS, MARKER, latest_checkpoint, marker_problem
from pipeline.storage import Storage

FINAL = "final_policy"  # STORAGE/final_policy: what jobs.rlhf writes at the end, and jobs.export's default
EXPORT_DTYPES = ("auto", "float32", "bfloat16")
PROVENANCE = "endorl_export.json"


class ExportError(ValueError):
    """An export that cannot be done; the message names the field and the fix."""


def default_output(run_dir: str, step: int | None) -> str:
    """RUN_DIR/final_policy for the newest checkpoint, RUN_DIR/export_step_N for a chosen one."""
    return Storage(run_dir).location_of(FINAL if step is None else f"export_step_{step}")


def complete_steps(storage: Storage) -> list[int]:
    """Steps of the checkpoints under CHECKPOINTS whose marker is valid, oldest first."""
    steps = []
    for name in storage.listdir(CHECKPOINTS):
        if name.startswith("step_") and name[5:].isdigit() and storage.exists(f"{CHECKPOINTS}/{name}/{MARKER}"):
            if marker_problem(storage, f"{CHECKPOINTS}/{name}", int(name[5:])) is None:
                steps.append(int(name[5:]))
    return sorted(steps)


def find_checkpoint(run_dir: str, step: int | None = None) -> tuple[str, int]:
    """(checkpoint folder relative to the run, step): the chosen step's, or the newest complete one."""
    storage = Storage(run_dir)
    if not storage.exists(""):
        raise ExportError(f"run folder {storage.location} does not exist. Fix: give the --storage of a jobs.rlhf run.")
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ExportError(f"run folder {storage.location} has no complete checkpoint under {CHECKPOINTS}/ (a "
                              f"checkpoint is complete once its {MARKER} is written). Fix: let the run reach a "
                              f"checkpoint (--checkpoint_every K, and jobs.rlhf always checkpoints the last step "
                              f"when --export is on), or resume it.")
        return found
    path = f"{CHECKPOINTS}/step_{step:06d}"
    steps = complete_steps(storage)
    if step not in steps:
        why = ("is not complete (no valid " + MARKER + ")") if storage.exists(path) else "does not exist"
        raise ExportError(f"--step {step}: checkpoint {storage.location_of(path)} {why}. Fix: --step one of "
                          f"{steps or 'none: this run has no complete checkpoint'}, or leave --step out for the newest.")
    return path, step


def run_config(storage: Storage, checkpoint: str) -> dict:
    """The config the checkpoint was made with (its own config.yaml, else the run's)."""
    for relative in (f"{checkpoint}/config.yaml", "config.yaml"):
        if storage.exists(relative):
            config = yaml.safe_load(storage.read_text(relative)) or {}
            if not isinstance(config.get("model"), dict) or not config["model"].get("name"):
                raise ExportError(f"{storage.location_of(relative)} has no model.name. Fix: restore the config.yaml "
                                  f"that jobs.rlhf wrote for this run.")
            return config
    raise ExportError(f"neither {storage.location_of(checkpoint)}/config.yaml nor {storage.location_of('config.yaml')} "
                      f"exists: the export needs the run's config to know the base model (model.name). Fix: restore "
                      f"the config.yaml that jobs.rlhf wrote into the run folder.")


def export_dtype(requested: str, storage: Storage, config: dict) -> str:
    """float32 or bfloat16: `requested`, or for auto the compute dtype the run's policy learners resolved."""
    if requested not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {requested!r} is not one of {list(EXPORT_DTYPES)}. Fix: --dtype auto")
    if requested != "auto":
        return requested
    if storage.exists("precision.json"):
        records = json.loads(storage.read_text("precision.json")).get("policy_learners") or []
        if records and records[0].get("dtype") in DTYPES:
            return records[0]["dtype"]
    learner, model = config.get("learner") or {}, config.get("model") or {}
    return resolve_dtype(learner.get("dtype", "auto"), model.get("device", "cpu"))


# ----------------------------------------------------------------------------------------------- consolidate


def consolidate(policy_dir: str) -> dict[str, torch.Tensor]:
    """The full float32 state dict (HF names) of a local DeepSpeed checkpoint folder (with its 'latest' file)."""
    latest = os.path.join(policy_dir, "latest")
    if not os.path.isfile(latest):
        raise ExportError(f"{policy_dir} holds no DeepSpeed checkpoint (no 'latest' file). Fix: export another step.")
    with open(latest) as fh:
        tag_dir = os.path.join(policy_dir, fh.read().strip())
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1..3: the float32 partitions of every rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(policy_dir)
    # ZeRO 0: the whole module is in the model-states file (float32: the learner never runs DeepSpeed's fp16/bf16)
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()}


def policy_model(base_path: str, state_dict: dict[str, torch.Tensor]):
    """The base architecture holding `state_dict` in float32; every weight must come from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path), dtype=torch.float32)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    state = dict(state_dict)
    if tied and "lm_head.weight" in state:  # the same tensor as the embedding; checked, then loaded once
        head = state.pop("lm_head.weight")
        embedding = model.get_input_embeddings()
        name = next(n for n, p in model.named_parameters() if p is embedding.weight)
        if name in state and not torch.equal(head, state[name]):
            raise ExportError(f"the checkpoint's lm_head.weight differs from {name}, but the base model ties them. "
                              f"Fix: export with the base model the run trained (model.name in its config.yaml).")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (tied and n == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"the checkpoint does not fit the base model's architecture: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}. Fix: model.name in the run's config.yaml must be the model "
                          f"the run trained.")
    if tied:
        model.tie_weights()
    return model.eval()


def write_hf_folder(model, tokenizer, generation_config, out_dir: str, dtype: str, provenance: dict) -> None:
    """save_pretrained (safetensors) in `dtype`, the tokenizer (chat template included), the generation config."""
    model = model.to(DTYPES[dtype])
    model.generation_config = generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, PROVENANCE), "w") as fh:
        json.dump(provenance, fh, indent=2)


def generation_config_for(base_path: str, model, tokenizer, config: dict):
    """The base model's generation config, with EOS/pad set and sampling at the run's rollout temperature."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_path)
    except OSError:  # the base folder has none
        generation = GenerationConfig.from_model_config(model.config)
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rollout = config.get("rollout") or {}
    generation.do_sample = True  # the policy was trained on its own samples at this temperature
    generation.temperature = float(rollout.get("temperature", 1.0))
    generation.top_p = float(rollout.get("top_p", 1.0))
    return generation


# -------------------------------------------------------------------------------------------------- output


def check_output(output: str, overwrite: bool) -> None:
    target = Storage(output)
    if target.is_local and os.path.isfile(target.path()):
        raise ExportError(f"--output {target.location} is a file. Fix: give a folder path.")
    if target.listdir("") and not overwrite:
        raise ExportError(f"--output {target.location} exists and is not empty. Fix: --overwrite to replace it, or "
                          f"another --output.")


def publish(staging: str, output: str) -> None:
    """Move the finished folder `staging` to `output`, replacing what is there (check_output allowed it)."""
    target = Storage(output)
    if target.is_local:
        final = target.path()
        os.makedirs(os.path.dirname(final), exist_ok=True)
        old = f"{os.path.dirname(final)}/.{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    target.delete_dir("")  # object storage: no folder rename; a folder without config.json is no model
    with open(os.path.join(staging, "config.json"), "rb") as fh:
        config = fh.read()
    os.remove(os.path.join(staging, "config.json"))
    target.upload(staging, "")
    target.write_bytes("config.json", config)


def staging_dir(output: str) -> str:
    """A temporary folder next to a local output (same filesystem: the rename is atomic), else anywhere."""
    target = Storage(output)
    if not target.is_local:
        return tempfile.mkdtemp(prefix="endorl-export-")
    parent = os.path.dirname(target.path())
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target.path())}.partial-", dir=parent)


def export_policy(run_dir: str, step: int | None = None, output: str = "", dtype: str = "auto",
                  overwrite: bool = False) -> str:
    """Write the run's policy at `step` (default the newest complete checkpoint) as an HF folder; returns where."""
    from transformers import AutoTokenizer

    from pipeline.models import ModelNotFoundError, resolve_model

    storage = Storage(run_dir)
    checkpoint, step_found = find_checkpoint(run_dir, step)
    output = output or default_output(run_dir, step)
    check_output(output, overwrite)
    config = run_config(storage, checkpoint)
    chosen = export_dtype(dtype, storage, config)
    model_cfg = config["model"]
    try:
        base_path = resolve_model(model_cfg["name"], model_cfg.get("cache_dir", "~/.cache/endorl"))
        tokenizer = AutoTokenizer.from_pretrained(base_path)  # as the base ships it: no pad token added
    except (ModelNotFoundError, OSError) as e:
        raise ExportError(f"model.name {model_cfg['name']!r} (from the run's config.yaml) cannot be loaded here: {e}")
    with storage.readable_dir(f"{checkpoint}/policy") as policy_dir:
        state_dict = consolidate(policy_dir)
    model = policy_model(base_path, state_dict)
    del state_dict
    staging = staging_dir(output)
    try:
        provenance = {"run": storage.location, "checkpoint": storage.location_of(checkpoint), "step": step_found,
                      "base_model": model_cfg["name"], "dtype": chosen, "requested_dtype": dtype}
        write_hf_folder(model, tokenizer, generation_config_for(base_path, model, tokenizer, config), staging, chosen,
                        provenance)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Storage(output).location
