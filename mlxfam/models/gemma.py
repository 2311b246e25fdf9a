"""Gemma 1 (2B / 7B): Llama with (1+w) fp32 RMSNorms, a tanh-GELU GeGLU, embeddings x sqrt(hidden)
and a tied head; head_dim is its own field (256), not hidden / heads.

Every difference is a config value the shared modules read, so the model is Llama's.
"""

from __future__ import annotations

from ..errors import MlxfamError
from .base import ModelConfig, require
from .family import Family, Traits
from .llama import LlamaForCausalLM, llama_config, sanitize

# HF runs Gemma's MLP with the tanh GELU; the released configs still say hidden_act "gelu", which
# transformers rewrites to the tanh form. In `hidden_activation`, "gelu" would mean the exact GELU.
_TANH_GELU_NAMES = {"hidden_act": ("gelu", "gelu_pytorch_tanh"), "hidden_activation": ("gelu_pytorch_tanh",)}


def gemma_config(hf: dict, **overrides) -> ModelConfig:
    for key, tanh_names in _TANH_GELU_NAMES.items():
        if hf.get(key) is not None and hf[key] not in tanh_names:
            raise MlxfamError(
                f"config.json: {key} {hf[key]!r} is not supported for Gemma "
                f"(supported: {', '.join(repr(n) for n in tanh_names)}, the tanh GELU)"
            )
    if hf.get("use_bidirectional_attention"):
        raise MlxfamError("config.json: use_bidirectional_attention true is not supported (causal decoding only)")
    require(hf, "head_dim")  # Gemma's head_dim is not hidden / heads; never guess it
    gemma_fields = {
        "norm": "gemma",
        "activation": "gelu_tanh",
        "embedding_scale": require(hf, "hidden_size") ** 0.5,
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        **overrides,
    }
    # llama_config would refuse the GELU names checked above
    return llama_config({k: v for k, v in hf.items() if k not in _TANH_GELU_NAMES}, **gemma_fields)


FAMILY = Family(
    name="gemma",
    description="Gemma 1 (2B, 7B)",
    model_types=("gemma",),
    architectures=("GemmaForCausalLM",),
    config=gemma_config,
    model_class=LlamaForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        norm="RMSNorm (1+w), fp32",
        activation="GeGLU (tanh GELU)",
        attention="MHA; MQA (2B); head_dim 256",
        head="tied",
        scalings="embeddings x sqrt(hidden)",
    ),
)
