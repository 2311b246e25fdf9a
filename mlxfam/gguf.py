"""GGUF files (llama.cpp) -> an HF-style config and HF-named tensors, by the GGUF names (`GgufNames`) of the
family whose architecture the file declares.

`mx.load` parses the file and keeps Q4_0 / Q4_1 / Q8_0 tensors quantized as MLX affine
quantization (group size 32: `name.weight` packed uint32, `name.scales`, `name.biases`);
F16 / F32 tensors come back as they are. Where llama.cpp's converter permuted the rows of projections
for its interleaved rotary (the family's `permuted_heads`), that is undone here so the model uses HF's
half-split rotary like the family's HF checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from .errors import MlxfamError

if TYPE_CHECKING:
    from .models.family import GgufNames

GROUP_SIZE = 32  # every GGUF block format MLX keeps quantized has 32 values per block


@dataclass(frozen=True)
class ArchitectureMetadata:
    """A GGUF file's `<architecture>.<key>` metadata fields, as a family's GGUF config reads them."""

    metadata: dict
    architecture: str
    path: Path

    def get(self, key: str, default=None):
        return _scalar(self.metadata.get(f"{self.architecture}.{key}", default))

    def __call__(self, key: str, default=None):
        """The field's value, else `default`; a field without either is an error."""
        value = self.get(key, default)
        if value is None:
            raise MlxfamError(f"{self.path}: GGUF metadata has no '{self.architecture}.{key}'")
        return value


def _scalar(value):
    return value.item() if isinstance(value, mx.array) else value


def _names(metadata: dict, path: Path) -> GgufNames:
    """The GGUF names of the family whose llama.cpp architecture the file declares."""
    from .models import FAMILIES

    arch = metadata.get("general.architecture")
    supported = [f.gguf for f in FAMILIES if f.gguf is not None]
    names = next((n for n in supported if n.architecture == arch), None)
    if names is None:
        raise MlxfamError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(n.architecture for n in supported)})"
        )
    return names


def _hf_name(name: str, names: GgufNames, path: Path) -> str:
    stem, _, suffix = name.rpartition(".")  # suffix: weight / scales / biases / bias
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part in names.layer_names:
            return f"model.layers.{layer}.{names.layer_names[part]}.{suffix}"
    elif stem in names.global_names:
        return f"{names.global_names[stem]}.{suffix}"
    raise MlxfamError(f"{path}: unexpected tensor {name!r} for a {names.architecture}-architecture GGUF")


def _unpermute_rows(x: mx.array, heads: int) -> mx.array:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, half) go back to (half, pair)."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_config_from_metadata(metadata: dict, tensors: dict, path: Path) -> dict:
    names = _names(metadata, path)
    return names.config(ArchitectureMetadata(metadata, names.architecture, path), tensors, path)


def read(path: Path) -> tuple[dict, dict[str, mx.array], dict]:
    """Returns (HF config dict, HF-named tensors, raw GGUF metadata for the tokenizer)."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise MlxfamError(f"{path}: unreadable or truncated GGUF file ({e})") from None
    config = hf_config_from_metadata(metadata, tensors, path)
    names = _names(metadata, path)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    if rope_freqs is not None:  # Llama 3.1 GGUFs store the llama3 scaling as per-frequency divisors
        config["rope_freq_factors"] = rope_freqs.tolist()
    heads = {part: config[key] for part, key in names.permuted_heads.items()}
    weights = {}
    for name, tensor in tensors.items():
        part = name.split(".")[2] if name.startswith("blk.") else None
        if part in heads:  # weight, quantization scales/biases and bias rows alike
            tensor = _unpermute_rows(tensor, heads[part])
        weights[_hf_name(name, names, path)] = tensor
    return config, weights, metadata
