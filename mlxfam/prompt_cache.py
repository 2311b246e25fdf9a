"""Prompt caches on disk: a model's KV cache, every layer, in one safetensors file, loaded back (in
this or another process) for the same model and cache settings only.

    save_prompt_cache("chat.cache", cache, model, metadata={"note": "anything JSON"})
    cache, metadata = load_prompt_cache("chat.cache", model, CacheOptions(kv_bits=8))

The file holds tensors `layers.{i}.{name}`, each layer's exported arrays ("keys"/"values", or
their packed "keys.data"/"keys.scales"/"keys.biases"/"keys.tail"..., and a rotating cache's
"unit_positions" and "tail_positions"),
and one JSON string in the safetensors metadata under `METADATA_KEY`:

    format, version
    model      the identity of the model it was made with: model class, its ModelConfig, the
               dtypes of its parameters and a fingerprint of their values
    layers     per layer: settings (the layer cache's own: its kind, KVCache or RotatingKVCache,
               and kv_bits, kv_group_size, quantized_kv_start, max_kv_size, keep as it has them),
               offset, family_state
    metadata   the caller's JSON values (the chat app keeps its conversation there)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import CacheOptions, layer_cache_from_settings
from .errors import MlxfamError

METADATA_KEY = "mlxfam.prompt_cache"
FORMAT = "mlxfam-prompt-cache"
VERSION = 3  # 2: quantized keys per channel in blocks, with a float tail; 3: each layer's cache kind
FINGERPRINT_VALUES = 64  # leading values of each parameter that go into the fingerprint


def model_identity(model) -> dict:
    """What a prompt cache is valid for. The fingerprint hashes every parameter's name, shape,
    dtype and first values: cheap, and two checkpoints of one architecture differ in them."""
    params = sorted(tree_flatten(model.parameters()), key=lambda item: item[0])
    digest = hashlib.sha256()
    for name, value in params:
        digest.update(f"{name}|{value.shape}|{value.dtype}|".encode())
        digest.update(np.array(value.reshape(-1)[:FINGERPRINT_VALUES].astype(mx.float32)).tobytes())
    floating = sorted(
        {str(v.dtype).removeprefix("mlx.core.") for _, v in params if mx.issubdtype(v.dtype, mx.floating)}
    )
    identity = {
        "model_class": type(model).__name__,
        "config": dataclasses.asdict(model.config),
        "dtype": ",".join(floating),
        "parameters": digest.hexdigest(),
    }
    return json.loads(json.dumps(identity))  # tuples become lists, as they come back from a file


def save_prompt_cache(path: str | os.PathLike, cache: list, model, metadata: dict | None = None) -> None:
    """Write `cache` (one cache per layer of `model`) and `metadata` (JSON values) to `path`.

    The file is written beside `path` and then moved over it, so an interrupted save leaves the
    previous file intact."""
    path = Path(path)
    arrays, layers = {}, []
    for i, layer in enumerate(cache):
        layer_arrays, info = layer.export()
        arrays.update({f"layers.{i}.{name}": a for name, a in layer_arrays.items()})
        layers.append({"settings": layer.settings, **info})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(model),
        "layers": layers,
        "metadata": metadata or {},
    }
    try:
        text = json.dumps(header)
    except TypeError as error:
        raise MlxfamError(f"prompt cache metadata and family_state must be JSON values: {error}") from None
    # mx.save_safetensors appends ".safetensors" to other names, so write under that suffix first.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata={METADATA_KEY: text})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_prompt_cache(
    path: str | os.PathLike, model, options: CacheOptions | None = None, **keywords
) -> tuple[list, dict]:
    """The cache saved at `path` and the caller's metadata saved with it.

    Refuses, naming what differs, a file made for another model (class, config field, dtype or
    weights) and, when cache options are given (`options` or their keywords, as `model.make_cache`
    takes them), one in which a layer's cache differs from the one `model.make_cache(options)` builds
    for that layer. Without options each layer's cache is rebuilt as it was saved."""
    source = str(path)
    if not Path(path).is_file():
        raise MlxfamError(f"prompt cache {source}: no such file")
    try:
        arrays, file_metadata = mx.load(source, format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise MlxfamError(f"prompt cache {source}: not a readable safetensors file ({error})") from None
    if METADATA_KEY not in file_metadata:
        raise MlxfamError(f"{source} is not an mlxfam prompt cache (no {METADATA_KEY!r} metadata)")
    header = json.loads(file_metadata[METADATA_KEY])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise MlxfamError(
            f"prompt cache {source}: format {header.get('format')!r} version {header.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION} (a file of another version must be made again)"
        )
    _check_identity(header["model"], model_identity(model), source)
    if len(header["layers"]) != len(model.layers):
        raise MlxfamError(f"prompt cache {source} has {len(header['layers'])} layers, the model {len(model.layers)}")
    if options is None and not keywords:
        cache = [
            layer_cache_from_settings(info["settings"], f"prompt cache {source}: layer {i}")
            for i, info in enumerate(header["layers"])
        ]
    else:
        cache = model.make_cache(options, **keywords)
        for i, (layer, info) in enumerate(zip(cache, header["layers"])):
            _check_settings(info["settings"], layer.settings, f"prompt cache {source}", i)
    for i, (layer, info) in enumerate(zip(cache, header["layers"])):
        prefix = f"layers.{i}."
        layer_arrays = {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}
        layer.restore(layer_arrays, info, f"prompt cache {source}: layer {i}")
    return cache, header["metadata"]


def _check_identity(saved: dict, current: dict, source: str) -> None:
    made_for = f"prompt cache {source} was made for another model"
    if saved["model_class"] != current["model_class"]:
        raise MlxfamError(f"{made_for}: a {saved['model_class']}, this is a {current['model_class']}")
    differing = [
        f"{name} is {saved['config'].get(name)!r} there, {current['config'].get(name)!r} here"
        for name in sorted(saved["config"].keys() | current["config"].keys())
        if saved["config"].get(name) != current["config"].get(name)
    ]
    if differing:
        raise MlxfamError(f"{made_for}: config {'; '.join(differing)}")
    if saved["dtype"] != current["dtype"]:
        raise MlxfamError(
            f"prompt cache {source} was made with the model in {saved['dtype']}; it is loaded in "
            f"{current['dtype']} now (pass the same --dtype / dtype)"
        )
    if saved["parameters"] != current["parameters"]:
        raise MlxfamError(
            f"{made_for}: same config and dtype, but other weights (parameter fingerprint "
            f"{saved['parameters'][:12]} there, {current['parameters'][:12]} here)"
        )


def _check_settings(saved: dict, expected: dict, source: str, layer: int) -> None:
    differing = [
        f"{name}={saved.get(name)!r} (asked for {expected.get(name)!r})"
        for name in sorted(saved.keys() | expected.keys())
        if saved.get(name) != expected.get(name)
    ]
    if differing:
        raise MlxfamError(f"{source} was saved with other cache settings: layer {layer} has {', '.join(differing)}")
