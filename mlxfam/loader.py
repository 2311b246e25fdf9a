"""Model reference -> (model, tokenizer): HF-format directories and GGUF files.

Weights are memory-mapped lazily by `mx.load`; nothing is materialised until the model is
evaluated (or `lazy=False` evaluates it once after loading). Legacy `pytorch_model*.bin` weights
(read when a directory has no safetensors) are copied once from their memory map on loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import gguf, hub, torch_bin
from .errors import MlxfamError
from .gguf_reader import read_gguf
from .gguf_split import split_parts
from .models import family_for
from .models.base import CausalLM
from .quantize import make_plan, quantize_model
from .tokenizer import Tokenizer, tokenizer_from_gguf
from .tokenizer import load_tokenizer as load_directory_tokenizer

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


def _checkpoint_files(model_dir: Path, index_name: str, pattern: str) -> list[Path]:
    """The shards an index names (all must be present), else the files matching `pattern`: maybe none."""
    index = model_dir / index_name
    if not index.is_file():
        return sorted(model_dir.glob(pattern))
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not weight_map:
        raise MlxfamError(f"{index}: no 'weight_map'")
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MlxfamError(f"{index}: shard(s) listed but not present: {', '.join(missing)}")
    return files


def _listing(model_dir: Path) -> str:
    return ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"


def weight_files(model_dir: Path) -> list[Path]:
    """Safetensors when there are any, else the legacy pytorch_model*.bin that some repos (Baichuan,
    ChatGLM, InternLM, Qwen) ship alone."""
    files = _checkpoint_files(model_dir, "model.safetensors.index.json", "*.safetensors") or _checkpoint_files(
        model_dir, "pytorch_model.bin.index.json", "pytorch_model*.bin"
    )
    if not files:
        raise MlxfamError(
            f"{model_dir}: no *.safetensors weights (found: {_listing(model_dir)}), nor pytorch_model*.bin"
        )
    return files


def _load_safetensors(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise MlxfamError(f"{file}: unreadable or truncated safetensors file ({e})") from None


def load_weights(files: list[Path]) -> dict[str, mx.array]:
    """Tensors by name from safetensors and torch.save `.bin` files."""
    weights = {}
    for file in files:
        weights.update(torch_bin.load(file) if file.suffix == ".bin" else _load_safetensors(file))
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


def mlx_quantization(hf_config: dict, weights: dict[str, mx.array], source: str) -> dict | None:
    """The `quantization` block of an MLX-format config.json (mlx-lm writes it also as
    `quantization_config`), checked to be one this loader can honour; None for float checkpoints."""
    quantization = hf_config.get("quantization")
    legacy = hf_config.get("quantization_config")
    if quantization is None and isinstance(legacy, dict):
        if "quant_method" in legacy:
            raise MlxfamError(
                f"{source}: config.json quantization_config with quant_method {legacy['quant_method']!r} is not "
                "supported (only MLX affine quantization, as mlx-lm writes it)"
            )
        quantization = legacy
    if quantization is None:
        packed = next((name for name in weights if name.endswith(".scales")), None)
        if packed is not None:
            raise MlxfamError(f"{source}: tensor {packed} is quantized, but config.json has no 'quantization' block")
        return None
    if not isinstance(quantization, dict) or "group_size" not in quantization or "bits" not in quantization:
        raise MlxfamError(
            f"{source}: config.json 'quantization' must give 'group_size' and 'bits', got {quantization!r}"
        )
    modes = {entry.get("mode", "affine") for entry in [quantization, *quantization.values()] if isinstance(entry, dict)}
    if modes != {"affine"}:
        raise MlxfamError(f"{source}: quantization mode(s) {sorted(modes - {'affine'})} not supported (only 'affine')")
    return quantization


def _packed_layout(path: str, in_dims: int, weights: dict[str, mx.array], source: str) -> tuple[int, int]:
    """(group size, bits) that the packed `path.weight` and `path.scales` of a layer with `in_dims` inputs hold."""
    packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
    groups, words = scales.shape[-1], packed.shape[-1]
    if in_dims % groups or (words * 32) % in_dims:
        raise MlxfamError(
            f"{source}: {path}.weight {tuple(packed.shape)} and {path}.scales {tuple(scales.shape)} are no "
            f"quantization of a layer with {in_dims} inputs"
        )
    return in_dims // groups, words * 32 // in_dims


def _quantize_like(model: nn.Module, weights: dict[str, mx.array], quantization: dict | None, source: str):
    """Swap in quantized layers wherever the checkpoint holds packed weights (`.scales` next to them).

    Group size and bits are read off the packed shapes (so GGUF files, whose block formats differ per
    tensor, load as they are); `quantization`, an mlx-lm config block (defaults plus per-layer entries,
    an entry `false` for a layer left unquantized), must agree with them.
    """
    default = {"group_size": quantization["group_size"], "bits": quantization["bits"]} if quantization else None
    quantized = []

    def params_for(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        entry = quantization.get(path, {}) if quantization else None
        # What the config says of this layer: None (nothing), False (unquantized) or its group size and bits.
        expected = {**default, **entry} if isinstance(entry, dict) else None if entry is None else False
        if f"{path}.scales" not in weights:
            if entry:  # an explicit per-layer entry
                raise MlxfamError(
                    f"{source}: config.json quantizes {path} ({expected['bits']}-bit, group size "
                    f"{expected['group_size']}), but {path}.weight is not quantized (no {path}.scales)"
                )
            return False
        group_size, bits = _packed_layout(path, module.weight.shape[-1], weights, source)
        if expected is False:
            raise MlxfamError(f"{source}: config.json says {path} is unquantized, but {path}.scales is present")
        if expected and (expected["group_size"], expected["bits"]) != (group_size, bits):
            raise MlxfamError(
                f"{source}: config.json quantization says {path} is {expected['bits']}-bit with group size "
                f"{expected['group_size']}, but {path}.weight {tuple(weights[f'{path}.weight'].shape)} is "
                f"{bits}-bit with group size {group_size}"
            )
        quantized.append(path)
        return {"group_size": group_size, "bits": bits}

    nn.quantize(model, class_predicate=params_for)
    if quantization is not None and not quantized:
        first = next(path for path, module in model.named_modules() if hasattr(module, "to_quantized"))
        raise MlxfamError(
            f"{source}: config.json has a 'quantization' block ({default['bits']}-bit), but no tensor is quantized: "
            f"{first}.weight has no {first}.scales"
        )


# config.json key of a directory `mlxfam convert` wrote under mlxfam's own parameter names (the
# families whose original layout mlx-lm does not share): its tensors need no family conversion.
MLXFAM_LAYOUT = "mlxfam_layout"


def build_model(
    hf_config: dict,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None = None,
    source: str = "checkpoint",
    quantization: dict | None = None,
) -> CausalLM:
    """`quantization`: the checkpoint's mlx-lm quantization block, if any (packed tensors are read as they are)."""
    family = family_for(hf_config, source=f"{source} config")
    cfg = family.config(hf_config)
    model = family.model_class(cfg)
    if not hf_config.get(MLXFAM_LAYOUT):
        weights = family.sanitize(weights, cfg)
    _quantize_like(model, weights, quantization, source)
    _check_tensors(model, weights, source)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def load_model_dir(model_dir: Path, dtype: mx.Dtype | None) -> tuple[CausalLM, Tokenizer | None, dict]:
    hf_config = read_config(model_dir)
    weights = load_weights(weight_files(model_dir))
    quantization = mlx_quantization(hf_config, weights, str(model_dir))
    model = build_model(hf_config, weights, dtype, source=str(model_dir), quantization=quantization)
    return model, load_directory_tokenizer(model_dir), hf_config


def load_gguf(path: Path, dtype: mx.Dtype | None) -> tuple[CausalLM, Tokenizer | None, dict]:
    hf_config, weights, metadata = gguf.read(path)
    model = build_model(hf_config, weights, dtype, source=str(path))
    tokenizer = tokenizer_from_gguf(metadata) if "tokenizer.ggml.model" in metadata else None
    return model, tokenizer, hf_config


def load_resolved(path: Path, dtype: mx.Dtype | None) -> tuple[CausalLM, Tokenizer | None, dict]:
    """A local directory or `.gguf` file -> (lazy model, tokenizer or None, its HF-style config dict)."""
    return load_gguf(path, dtype) if path.suffix == ".gguf" else load_model_dir(path, dtype)


def load(
    ref: str | Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    quantize: int | None = None,
    group_size: int | None = None,
) -> tuple[CausalLM, Tokenizer | None]:
    """Loads an alias, HF repo id, local directory or `.gguf` file (the first part of a split one); a repo id or
    directory may end in `:TAG` to pick one of its GGUF files by quant tag (`owner/name:Q4_K_M`).

    `dtype` casts the floating-point weights (float16, bfloat16 or float32); by default they keep
    the checkpoint's dtype. Quantized tensors (GGUF Q4_0/Q4_1/Q8_0, MLX-quantized) stay quantized.
    `quantize` (2, 3, 4, 5, 6 or 8 bits; `group_size` 32, 64 or 128, default 64) quantizes the
    float matrices in memory, as `mlxfam convert --bits` would write them.
    """
    dtype = parse_dtype(dtype)
    plan = make_plan(bits=quantize, group_size=group_size)
    model, tokenizer, _ = load_resolved(hub.resolve(str(ref)), dtype)
    if plan is not None:
        quantize_model(model, plan)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer


def load_tokenizer(ref: str | Path) -> Tokenizer | None:
    """The tokenizer of an alias, HF repo id, local directory or `.gguf` file (a vocabulary-only GGUF too),
    without building the model or reading its weights (a reference not yet downloaded is downloaded as `load`
    would); None when the checkpoint has no tokenizer."""
    path = hub.resolve(str(ref))
    if path.suffix != ".gguf":
        return load_directory_tokenizer(path)
    split_parts(path)  # a split model's vocabulary is in its first part: the others are refused
    metadata = read_gguf(path).metadata
    return tokenizer_from_gguf(metadata) if "tokenizer.ggml.model" in metadata else None
