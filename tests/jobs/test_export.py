"""The exported policy of a real tiny run: transformers and vLLM load it as is and generate, and its log-probs equal
the learners' own. One run (1 step, 2 ZeRO-2 learner ranks, --checkpoint_every 0, so jobs.rlhf saves the last
step's checkpoint for the export) serves every assertion."""
import os

import numpy as np
import pytest
import torch

from jobs import export as export_job
from jobs import rlhf
from pipeline.export import FINAL, consolidate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, local_ray):
    """(run folder, the policy learners' full weights just before the actors stopped)."""
    from actors.groups import RLWorkers

    storage = tmp_path_factory.mktemp("export_run")
    captured = {}
    shutdown = RLWorkers.shutdown

    def capture_then_shutdown(self):  # the learners' own weights (rank 0's gathered state dict), before they go
        if self.learner is not None and self.learner.actors and "state" not in captured:
            captured["state"] = local_ray.get(self.learner.state_dict_ref())
        shutdown(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RLWorkers, "shutdown", capture_then_shutdown)
        rlhf.main(["--local", "--model.name", tiny_model_dir, "--rollout_dtype", "float32", "--steps", "1",
                   "--prompts_per_step", "2", "--rollout.n_samples", "2", "--rollout.max_new_tokens", "8",
                   "--rollout.max_prompt_tokens", "128", "--rollout.temperature", "0.8", "--learner.ranks", "2",
                   "--learner.zero_stage", "2", "--learner.lr", "1e-3", "--learner.dtype", "float32",
                   "--eval_every", "0", "--sync_check_every", "0", "--checkpoint_every", "0", "--storage", str(storage)])
    return storage, captured["state"]


def probe(tokenizer):
    """A chat-templated prompt and a finished response after it (token ids), encoded as the run encodes them."""
    from pipeline.chat import encode_prompt, encode_response

    return (encode_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}]),
            encode_response(tokenizer, "The capital of France is Paris."))


def logprobs(model, prompt, response) -> np.ndarray:
    from pipeline.policy import policy_forward

    with torch.no_grad():
        values, _, _ = policy_forward(model, [np.array(prompt)], [np.array(response)], 1.0, entropy_grad=False)
    return values[0].double().numpy()


def test_exported_policy_loads_generates_and_matches_the_learner(run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pipeline.models import load_causal_lm

    storage, learner_state = run
    out = storage / FINAL
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (storage / "checkpoints" / "step_000001" / "driver_state.json").exists()  # saved for the export
    # the checkpoint holds exactly the learners' weights
    merged = consolidate(str(storage / "checkpoints" / "step_000001" / "policy"))
    for name, tensor in learner_state.items():
        if name in merged:
            assert torch.equal(merged[name], tensor), name

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # dtype auto = the learners' float32
    assert GenerationConfig.from_pretrained(out).temperature == 0.8
    prompt, response = probe(tokenizer)
    learner = load_causal_lm(tiny_model_dir, "float32")
    base = logprobs(learner, prompt, response)
    learner.load_state_dict(learner_state)
    want, got = logprobs(learner, prompt, response), logprobs(model, prompt, response)
    print(f"exported vs learner: max |logprob diff| {np.max(np.abs(got - want)):.3g}; "
          f"vs base {np.max(np.abs(base - want)):.3g}")
    assert np.max(np.abs(base - want)) > 1e-3  # the step moved the policy: the comparison can tell them apart
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    generated = model.generate(**chat, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > chat["input_ids"].shape[1]

    # vLLM loads the same folder as is (float32 on CPU): it generates, and its log-probs match the learner's
    from actors.cluster import RayConfig, worker_env
    from pipeline.rollout import prompt_logprobs_to_numpy

    saved = dict(os.environ)
    os.environ.update(worker_env(RayConfig(vllm_cpu_kvcache_gib=1)), VLLM_CPU_OMP_THREADS_BIND="0")
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=str(out), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
        text = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=5), use_tqdm=False)
        assert len(text[0].outputs[0].token_ids) > 0
        scored = llm.generate([TokensPrompt(prompt_token_ids=prompt + response)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        engine = prompt_logprobs_to_numpy(scored[0].prompt_logprobs, prompt + response, start=len(prompt))
        print(f"vLLM vs learner: max |logprob diff| {np.max(np.abs(engine - want)):.3g}")
        np.testing.assert_allclose(engine, want, atol=1e-3, rtol=0)  # the sync check's float32 tolerance
        del llm
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_export_job_writes_a_chosen_step_in_bfloat16(run):
    from transformers import AutoModelForCausalLM

    storage, _ = run
    out = export_job.main([str(storage), "--step", "1", "--dtype", "bfloat16"])
    assert out == str(storage / "export_step_1")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="exists and is not empty.*--overwrite"):
        export_job.main([str(storage), "--step", "1"])
    with pytest.raises(SystemExit, match=r"--step 5: .*does not exist.*one of \[1\]"):
        export_job.main([str(storage), "--step", "5"])
