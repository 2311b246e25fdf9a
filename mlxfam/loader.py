"""Model reference -> (model, tokenizer): HF-format directories and GGUF files.

Weights are memory-mapped lazily by `mx.load`; nothing is materialised until the model is
evaluated (or `lazy=False` evaluates it once after loading).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import gguf, hub
from .errors import MlxfamError
from .models import family_for
from .models.base import CausalLM
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise MlxfamError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MlxfamError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxfamError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise MlxfamError(f"{index}: no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MlxfamError(f"{index}: shard(s) listed but not present: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        present = ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"
        raise MlxfamError(f"{model_dir}: no *.safetensors weights (found: {present})")
    return files


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise MlxfamError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    return weights


def _check_tensors(model: nn.Module, weights: dict[str, mx.array], source: str):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise MlxfamError(f"{source}: missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise MlxfamError(f"{source}: unexpected tensor(s): {', '.join(unexpected)}")
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise MlxfamError(
                f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, expected {tuple(param.shape)}"
            )


def _quantize_like(model: nn.Module, weights: dict[str, mx.array], group_size: int):
    """Swap in quantized layers wherever the checkpoint holds packed weights (`.scales` next to them).

    Bits are read off the packed shapes, so files that mix bit widths per tensor load as they are.
    """

    def params_for(path: str, module: nn.Module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        packed = weights[f"{path}.weight"]
        bits = packed.shape[-1] * 32 // (scales.shape[-1] * group_size)
        return {"group_size": group_size, "bits": bits}

    nn.quantize(model, class_predicate=params_for)


def build_model(
    hf_config: dict,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None = None,
    source: str = "checkpoint",
    group_size: int | None = None,
) -> CausalLM:
    family = family_for(hf_config, source=f"{source} config")
    cfg = family.config(hf_config)
    model = family.model_class(cfg)
    weights = family.sanitize(weights, cfg)
    if group_size is not None:
        _quantize_like(model, weights, group_size)
    _check_tensors(model, weights, source)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def load_model_dir(model_dir: Path, dtype: mx.Dtype | None) -> tuple[CausalLM, Tokenizer | None]:
    hf_config = read_config(model_dir)
    weights = load_safetensors(safetensors_files(model_dir))
    quantization = hf_config.get("quantization")
    group_size = quantization["group_size"] if quantization else None
    model = build_model(hf_config, weights, dtype, source=str(model_dir), group_size=group_size)
    return model, load_tokenizer(model_dir)


def load_gguf(path: Path, dtype: mx.Dtype | None) -> tuple[CausalLM, Tokenizer | None]:
    hf_config, weights, metadata = gguf.read(path)
    model = build_model(hf_config, weights, dtype, source=str(path), group_size=gguf.GROUP_SIZE)
    tokenizer = tokenizer_from_gguf(metadata) if "tokenizer.ggml.model" in metadata else None
    return model, tokenizer


def load(ref: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> tuple[CausalLM, Tokenizer | None]:
    """Loads an alias, HF repo id, local directory or `.gguf` file.

    `dtype` casts the floating-point weights (float16, bfloat16 or float32); by default they keep
    the checkpoint's dtype. Quantized tensors (GGUF Q4_0/Q4_1/Q8_0, MLX-quantized) stay quantized.
    """
    dtype = parse_dtype(dtype)
    path = hub.resolve(str(ref))
    if path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
    else:
        model, tokenizer = load_model_dir(path, dtype)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer
