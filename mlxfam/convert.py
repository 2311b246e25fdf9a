"""`mlxfam convert`: any model mlxfam loads -> an MLX-format directory that mlx-lm (and mlxfam) load.

The directory is what `mlx_lm.convert` writes: `config.json` (the source's HF config, with mlx-lm's
`quantization` block, also as `quantization_config`), weights under mlx-lm's tensor names in
`model.safetensors` or 5 GB shards (always with `model.safetensors.index.json`, `"format": "mlx"`
metadata), and the tokenizer: the source directory's own files, or for a GGUF source `tokenizer.json`
and `tokenizer_config.json` written by `Tokenizer.save_pretrained`.

Quantized tensors of the source (GGUF Q4_0/Q4_1/Q8_0, an MLX file's) are kept as they are;
`dequantize=True` turns them to float first (and the plan, if any, then requantizes them).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import hub, loader
from .errors import MlxfamError
from .models import family_for
from .quantize import bits_per_weight, dequantize_model, make_plan, mlx_lm_config, quantize_model

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB

# What a Hugging Face directory holds besides weights that the converted one needs (tokenizer,
# chat template, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "*.tiktoken",
)


@dataclass(frozen=True)
class Converted:
    path: Path
    quantization: dict | None  # the mlx-lm block written to config.json (None: unquantized)
    bits_per_weight: float
    files: tuple[str, ...]


def convert(
    ref: str | Path,
    out: str | Path,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    dtype: str | None = None,
    dequantize: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Converted:
    """Writes `ref` (alias, repo id, directory or .gguf) to the new directory `out`.

    `bits`/`group_size`, a `recipe` (name or JSON file) and `overrides` (`PATTERN=BITS[:GROUP]|none`)
    say how float layers are quantized (see mlxfam.quantize); `dtype` casts the float tensors first.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MlxfamError(f"{out}: already exists and is not an empty directory")
    plan = make_plan(bits, group_size, recipe, overrides)
    source = hub.resolve(str(ref))
    model, tokenizer, hf_config = loader.load_resolved(source, loader.parse_dtype(dtype))
    config = mlx_lm_model_config(hf_config, str(source))
    if dequantize:
        dequantize_model(model)
    if plan is not None:
        quantize_model(model, plan)
    quantization = mlx_lm_config(model, plan.default if plan is not None else None)

    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, dict(tree_flatten(model.parameters())), max_shard_bytes)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    if dtype is not None:
        config["torch_dtype"] = dtype
    if source.suffix == ".gguf" and tokenizer is not None:
        config["eos_token_id"] = tokenizer.eos_token_ids  # a GGUF's end-of-generation ids, for every reader
        tokenizer.save_pretrained(out)
    elif source.is_dir():
        copy_tokenizer_files(source, out)
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    written = tuple(sorted(p.name for p in out.iterdir()))
    return Converted(out, quantization, bits_per_weight(model), written)


def mlx_lm_model_config(hf_config: dict, source: str) -> dict:
    """The source's config as mlx-lm reads it for our tensor names (its own quantization block dropped:
    the converted one describes the tensors actually written). A family without an mlx-lm layout
    (`Family.mlx_lm`) is written under mlxfam's own parameter names (already converted from the original
    layout), with `MLXFAM_LAYOUT` set in config.json so the loader reads them as they are; mlx-lm does
    not load those directories."""
    family = family_for(hf_config, source=f"{source} config")
    if hf_config.get("rope_freq_factors"):
        raise MlxfamError(
            f"{source}: the GGUF's rope_freqs (per-frequency rotary scaling) has no mlx-lm config field; "
            "convert the original Hugging Face checkpoint instead"
        )
    config = {k: v for k, v in hf_config.items() if k not in ("quantization", "quantization_config")}
    if family.mlx_lm is None:
        config[loader.MLXFAM_LAYOUT] = True
        return config
    renames = family.mlx_lm.model_type_renames
    config["model_type"] = renames.get(config.get("model_type"), config.get("model_type"))
    return config


def save_weights(out: Path, weights: dict[str, mx.array], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """mlx-lm's layout: shards of at most `max_shard_bytes` (a larger tensor gets one of its own), named
    model.safetensors or model-0000i-of-0000n.safetensors, and the index naming each tensor's shard."""
    shards: list[dict[str, mx.array]] = []
    shard_bytes = 0
    for name in sorted(weights):
        tensor = weights[name]
        if not shards or shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in weights.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def copy_tokenizer_files(source: Path, out: Path) -> None:
    for pattern in TOKENIZER_FILES:
        for file in source.glob(pattern):
            shutil.copyfile(file, out / file.name)
