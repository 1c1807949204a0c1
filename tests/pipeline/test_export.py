"""pipeline/export.py: refusals that name the field and the fix, and a whole export from a stage-0 checkpoint.

The stage-0 checkpoint here is written by hand in DeepSpeed's layout (policy/latest + policy/<tag>/
mp_rank_00_model_states.pt with the module's state dict), so no DeepSpeed engine starts; a real ZeRO-2 checkpoint
of two ranks is exported in tests/jobs/test_export.py.
"""
import json
import os

import pytest
import torch
import yaml

from jobs import export as export_job
from pipeline.export import (FINAL, PROVENANCE, ExportError, default_output, export_dtype, export_policy,
                             find_checkpoint, policy_model)
from pipeline.runlog import MARKER
from pipeline.storage import Storage


def checkpoint(run, step, marker=True, config=None):
    folder = run / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    if marker:
        (folder / MARKER).write_text(json.dumps({"step": step}))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_run_folder_without_a_complete_checkpoint(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nothing"))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint.*Fix"):
        find_checkpoint(str(run))
    checkpoint(run, 2, marker=False)  # torn: no marker
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_policy(str(run))


def test_bad_step_lists_the_complete_ones(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 2)
    checkpoint(run, 4, marker=False)
    assert find_checkpoint(str(run)) == ("checkpoints/step_000002", 2)
    assert find_checkpoint(str(run), 2) == ("checkpoints/step_000002", 2)
    with pytest.raises(ExportError, match=r"--step 4: .*step_000004 is not complete.*--step one of \[2\]"):
        find_checkpoint(str(run), 4)
    with pytest.raises(ExportError, match=r"--step 3: .*does not exist.*--step one of \[2\]"):
        find_checkpoint(str(run), 3)


def test_missing_config_yaml(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 1)
    with pytest.raises(ExportError, match=r"config.yaml.*model.name.*Fix: restore"):
        export_policy(str(run))


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 1)
    (run / FINAL).mkdir()
    (run / FINAL / "x").write_text("old")
    with pytest.raises(ExportError, match=r"--output .*final_policy exists and is not empty.*--overwrite"):
        export_policy(str(run))
    with pytest.raises(ExportError, match="config.yaml"):  # --overwrite gets past the output check
        export_policy(str(run), overwrite=True)
    assert (run / FINAL / "x").read_text() == "old"  # a failed export leaves the old folder alone


def test_default_output_and_dtype(tmp_path):
    assert default_output(str(tmp_path), None) == str(tmp_path / FINAL)
    assert default_output(str(tmp_path), 8) == str(tmp_path / "export_step_8")
    storage = Storage(str(tmp_path))
    config = {"learner": {"dtype": "float32"}, "model": {"device": "cpu"}}
    assert export_dtype("bfloat16", storage, config) == "bfloat16"
    assert export_dtype("auto", storage, config) == "float32"  # no precision.json: the run's learner.dtype
    (tmp_path / "precision.json").write_text(json.dumps({"policy_learners": [{"dtype": "bfloat16"}]}))
    assert export_dtype("auto", storage, config) == "bfloat16"  # what the learners resolved on their node
    with pytest.raises(ExportError, match="--dtype 'fp16'.*--dtype auto"):
        export_dtype("fp16", storage, config)


def test_job_takes_the_run_folder_positionally(tmp_path):
    with pytest.raises(SystemExit, match=r"jobs.export: run folder .*nothing does not exist"):
        export_job.main([str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--run_dir is empty"):
        export_job.main([])
    with pytest.raises(SystemExit, match="--dtype: 'fp16' is not one of"):
        export_job.main([str(tmp_path), "--dtype", "fp16"])


# ------------------------------------------------------------------------- a whole export (tiny model, no DeepSpeed)


@pytest.fixture
def stage0_run(tmp_path, tiny_model_dir):
    """A run folder whose step-3 checkpoint holds the tiny model's weights, perturbed (so they are not the base's),
    in DeepSpeed's stage-0 layout, without the tied lm_head (as a module state dict may come)."""
    from pipeline.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, "float32")
    torch.manual_seed(1)
    state = {name: tensor + 0.01 * torch.randn_like(tensor) for name, tensor in model.state_dict().items()
             if name != "lm_head.weight"}
    run = tmp_path / "run"
    config = {"model": {"name": tiny_model_dir, "device": "cpu"}, "learner": {"dtype": "float32"},
              "rollout": {"temperature": 0.7, "top_p": 1.0}}
    folder = checkpoint(run, 3, config=config)
    (folder / "policy" / "global_step3").mkdir(parents=True)
    (folder / "policy" / "latest").write_text("global_step3")
    torch.save({"module": state}, folder / "policy" / "global_step3" / "mp_rank_00_model_states.pt")
    return run, state


def test_export_from_a_stage0_checkpoint_loads_as_is(stage0_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run, state = stage0_run
    out = export_policy(str(run))
    assert out == str(run / FINAL)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", PROVENANCE} <= files
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # no staging folder left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    for name, tensor in state.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # chat works: the template came along
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.temperature == 0.7
    assert json.loads((run / FINAL / PROVENANCE).read_text())["step"] == 3

    with pytest.raises(ExportError, match="exists and is not empty"):
        export_policy(str(run))
    out = export_policy(str(run), dtype="bfloat16", overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    assert export_policy(str(run), step=3) == str(run / "export_step_3")


def test_tied_head_must_equal_the_embedding(stage0_run, tiny_model_dir):
    _, state = stage0_run
    head = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"].clone()})
    policy_model(tiny_model_dir, head)  # the same values: accepted
    head["lm_head.weight"] += 1
    with pytest.raises(ExportError, match="lm_head.weight differs from model.embed_tokens.weight"):
        policy_model(tiny_model_dir, head)
    with pytest.raises(ExportError, match=r"missing \['model.norm.weight'\]"):
        policy_model(tiny_model_dir, {k: v for k, v in state.items() if k != "model.norm.weight"})
