"""GGUF files (llama.cpp) -> an HF-style config and HF-named tensors.

`mx.load` parses the file and keeps Q4_0 / Q4_1 / Q8_0 tensors quantized as MLX affine
quantization (group size 32: `name.weight` packed uint32, `name.scales`, `name.biases`);
F16 / F32 tensors come back as they are. llama.cpp's converter permutes the rows of the q and k
projections for its interleaved rotary; that is undone here so the model uses HF's half-split
rotary like every other Llama checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .errors import MlxfamError

GROUP_SIZE = 32  # every GGUF block format MLX keeps quantized has 32 values per block

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names (per block `blk.N.`) -> HF Llama names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _scalar(value):
    return value.item() if isinstance(value, mx.array) else value


def _hf_name(name: str, path: Path) -> str:
    stem, _, suffix = name.rpartition(".")  # suffix: weight / scales / biases / bias
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    elif stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    raise MlxfamError(f"{path}: unexpected tensor {name!r} for a llama-architecture GGUF")


def _unpermute_rows(x: mx.array, heads: int) -> mx.array:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, half) go back to (half, pair)."""
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_config_from_metadata(metadata: dict, tensors: dict, path: Path) -> dict:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MlxfamError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def field(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise MlxfamError(f"{path}: GGUF metadata has no '{arch}.{key}'")
        return _scalar(value)

    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rotary_dims = int(field("rope.dimension_count", config["head_dim"]))
    if rotary_dims != config["head_dim"]:
        raise MlxfamError(
            f"{path}: partial rotary ({rotary_dims} of {config['head_dim']} dims) is not supported for llama"
        )
    scaling = _scalar(metadata.get(f"{arch}.rope.scaling.type", "none"))
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(field("rope.scaling.factor"))}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(_scalar(original))
    elif scaling != "none":
        raise MlxfamError(f"{path}: GGUF rope scaling {scaling!r} is not supported (supported: linear, yarn)")
    return config


def read(path: Path) -> tuple[dict, dict[str, mx.array], dict]:
    """Returns (HF config dict, HF-named tensors, raw GGUF metadata for the tokenizer)."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise MlxfamError(f"{path}: unreadable or truncated GGUF file ({e})") from None
    config = hf_config_from_metadata(metadata, tensors, path)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    if rope_freqs is not None:  # Llama 3.1 GGUFs store the llama3 scaling as per-frequency divisors
        config["rope_freq_factors"] = rope_freqs.tolist()
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for name, tensor in tensors.items():
        part = name.split(".")[2] if name.startswith("blk.") else None
        if part in heads:  # weight, quantization scales/biases and bias rows alike
            tensor = _unpermute_rows(tensor, heads[part])
        weights[_hf_name(name, path)] = tensor
    return config, weights, metadata
