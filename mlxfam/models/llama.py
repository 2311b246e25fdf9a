"""Llama 1/2/3/3.1, Code Llama, Yi (also the legacy `YiForCausalLM`), Mistral, SmolLM2: the baseline.

Every other family is written as this one plus its differences.
"""

from __future__ import annotations

from ..errors import MlxfamError
from .base import CausalLM, DecoderModel, ModelConfig, require
from .family import Family, Traits
from .rope import RopeConfig


def llama_config(hf: dict, **overrides) -> ModelConfig:
    """A Llama-layout HF config (the keys transformers' LlamaConfig reads)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise MlxfamError(f"config.json: hidden_act {act!r} is not supported for a Llama-family model (only 'silu')")
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // heads
    layers = require(hf, "num_hidden_layers")
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    fields = dict(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(hf, "intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=RopeConfig.from_hf(hf, head_dim, hf.get("rope_theta", 10000.0)),
        max_position_embeddings=hf.get("max_position_embeddings"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        sliding_windows=(window,) * layers,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, DecoderModel(cfg))


# The Nov-2023 YiForCausalLM release named the two layer norms ln1 / ln2.
_YI_LEGACY_NAMES = {".ln1.": ".input_layernorm.", ".ln2.": ".post_attention_layernorm."}


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer the originals save; the rotary tables are recomputed
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        for old, new in _YI_LEGACY_NAMES.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


FAMILY = Family(
    name="llama",
    description="Llama 1/2/3/3.1, Code Llama, Yi, Mistral, SmolLM2",
    model_types=("llama", "mistral", "Yi", "yi"),
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "YiForCausalLM"),
    config=llama_config,
    model_class=LlamaForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        attention="MHA/GQA; Mistral: sliding window",
        head="untied (tied: Llama 3.2, SmolLM2)",
        scalings="rope linear/dynamic/llama3/yarn",
        tokenizer="SentencePiece; BPE (Llama 3, SmolLM2)",
    ),
)
