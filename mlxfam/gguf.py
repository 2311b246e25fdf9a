"""GGUF files (llama.cpp) -> an HF-style config and HF-named tensors, by the GGUF names (`GgufNames`) of the
family whose architecture the file declares.

mlxfam's own reader (`gguf_reader`) validates and memory-maps the file; `gguf_quants` turns block types
whose blocks are affine over 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) into MLX affine
quantization (group size 32: `name.weight` packed uint32, `name.scales`, `name.biases`), exactly;
F32 / F16 / BF16 tensors come back as they are. The 16-value sub-block types (Q2_K, Q3_K, Q6_K) have no
layer yet: they are expanded to float16, with a warning naming them. Where llama.cpp's converter permuted the rows of projections
for its interleaved rotary (the family's `permuted_heads`), that is undone here so the model uses HF's
half-split rotary like the family's HF checkpoints.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from .errors import MlxfamError
from .gguf_quants import GGUFQuantized, tensor_to_mlx
from .gguf_split import read_model_gguf

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


def _split_rows(name: str, tensor: mx.array, blocks: dict[str, int], path: Path) -> dict[str, mx.array]:
    """A fused tensor's row blocks (weight, quantization scales/biases and bias rows alike) under their HF names."""
    if sum(blocks.values()) != tensor.shape[0]:
        expected = " + ".join(f"{rows} ({hf_name})" for hf_name, rows in blocks.items())
        raise MlxfamError(f"{path}: tensor {name} has {tensor.shape[0]} rows, expected {expected}")
    offsets = list(itertools.accumulate(blocks.values()))[:-1]
    _, layer, _, suffix = name.split(".")
    parts = mx.split(tensor, offsets, axis=0)
    return {f"model.layers.{layer}.{hf_name}.{suffix}": part for hf_name, part in zip(blocks, parts)}


def _unpermute_rows(x: mx.array, heads: int) -> mx.array:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, half) go back to (half, pair)."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_config_from_metadata(metadata: dict, tensors: dict, path: Path) -> dict:
    names = _names(metadata, path)
    return names.config(ArchitectureMetadata(metadata, names.architecture, path), tensors, path)


def read(path: Path) -> tuple[dict, dict[str, mx.array], dict]:
    """Returns (HF config dict, HF-named tensors, raw GGUF metadata for the tokenizer); `path` may be the first
    part of a split GGUF, whose other parts are read with it."""
    gguf_file = read_model_gguf(path)
    metadata, tensors = gguf_file.metadata, _mlx_tensors(gguf_file, path)
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
        if part in names.fused:
            weights.update(_split_rows(name, tensor, names.fused[part](config), path))
        else:
            weights[_hf_name(name, names, path)] = tensor
    return config, weights, metadata


def _mlx_tensors(gguf_file, path: Path) -> dict[str, mx.array]:
    """The file's tensors under their GGUF names, a single-matrix quantized one as its weight/scales/biases."""
    tensors, expanded = {}, []
    for name, info in gguf_file.tensors.items():
        value = tensor_to_mlx(info, gguf_file.data(name))
        if not isinstance(value, GGUFQuantized):
            tensors[name] = value
        elif len(value.parts) == 1:
            stem, part = name.removesuffix(".weight"), value.parts[0]
            tensors[name], tensors[f"{stem}.scales"], tensors[f"{stem}.biases"] = part.weight, part.scales, part.biases
        else:
            tensors[name] = value.dequantize().astype(mx.float16)
            expanded.append(f"{name} ({value.type_name})")
    if expanded:
        print(
            f"mlxfam: warning: {path}: {len(expanded)} tensors of 16-value sub-block types expanded to float16 "
            f"(no quantized layer for them yet): {', '.join(expanded[:4])}{', ...' if len(expanded) > 4 else ''}",
            file=sys.stderr,
        )
    return tensors
