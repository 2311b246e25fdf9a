"""Qwen 1.5 and Qwen 2 (native `Qwen2ForCausalLM`): Llama with biased q/k/v projections (o_proj
has none), an optional sliding window on the upper layers and tied heads on the small sizes.
"""

from __future__ import annotations

from ..errors import MlxfamError
from .base import ModelConfig, require
from .family import Family, Traits
from .llama import LlamaForCausalLM, llama_config, sanitize

_LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_windows(hf: dict) -> tuple[int | None, ...]:
    """transformers 5's rule (docs/families.md#qwen2): with use_sliding_window, layers whose index is >=
    max_window_layers attend over the last `sliding_window` keys; `layer_types` may list it per layer."""
    layers = require(hf, "num_hidden_layers")
    window = require(hf, "sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)
    ]
    if len(layer_types) != layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise MlxfamError(
            f"config.json: layer_types {layer_types!r} must hold {layers} entries, "
            f"each one of {', '.join(_LAYER_TYPES)}"
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def qwen2_config(hf: dict) -> ModelConfig:
    return llama_config(hf, attention_bias=True, o_proj_bias=False, sliding_windows=sliding_windows(hf))


FAMILY = Family(
    name="qwen2",
    description="Qwen 1.5, Qwen 2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    config=qwen2_config,
    model_class=LlamaForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        biases="q/k/v",
        attention="MHA/GQA; sliding window on layers >= max_window_layers",
        head="untied; tied on the small sizes",
        scalings="rope yarn",
        tokenizer="byte-level BPE",
    ),
)
