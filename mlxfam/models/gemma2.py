"""Gemma 2 (2B / 9B / 27B): Gemma 1 plus a norm after attention and around the MLP, softcapped
attention scores and logits, query_pre_attn_scalar as the attention scale, and sliding-window
(local) layers alternating with global ones.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import MlxfamError
from .base import CausalLM, DecoderLayer, DecoderModel, ModelConfig, make_norm, require
from .family import Family, Traits
from .gemma import gemma_config
from .llama import sanitize

# transformers' Gemma2Config defaults for the fields that change the math (a config may omit them).
_DEFAULTS = {
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def gemma2_config(hf: dict) -> ModelConfig:
    hf = {**_DEFAULTS, **hf}
    layers = require(hf, "num_hidden_layers")
    # transformers 5 writes `layer_types`; older configs imply the pattern: even layers slide.
    layer_types = hf.get("layer_types") or [_LAYER_TYPES[i % 2] for i in range(layers)]
    if len(layer_types) != layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise MlxfamError(
            f"config.json: layer_types {layer_types} must name {layers} layers (num_hidden_layers), "
            f"each one of {', '.join(_LAYER_TYPES)}"
        )
    window = hf["sliding_window"]
    if window is None and "sliding_attention" in layer_types:
        raise MlxfamError("config.json: sliding_window is null but layer_types has sliding_attention layers")
    return gemma_config(
        hf,
        sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        attention_scale=hf["query_pre_attn_scalar"] ** -0.5,
        attention_softcap=hf["attn_logit_softcapping"],
        final_softcap=hf["final_logit_softcapping"],
    )


class Gemma2DecoderLayer(DecoderLayer):
    """h = x + norm(attn(norm(x))); out = h + norm(mlp(norm(h)))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.pre_feedforward_layernorm = make_norm(cfg)
        self.post_feedforward_layernorm = make_norm(cfg)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, DecoderModel(cfg, Gemma2DecoderLayer))


FAMILY = Family(
    name="gemma2",
    description="Gemma 2 (2B, 9B, 27B)",
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    config=gemma2_config,
    model_class=Gemma2ForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        norm="RMSNorm (1+w), fp32; 4 per layer",
        activation="GeGLU (tanh GELU)",
        attention="GQA; local (window) / global alternating; score softcap",
        head="tied; logit softcap",
        scalings="embeddings x sqrt(hidden); query_pre_attn_scalar",
    ),
)
