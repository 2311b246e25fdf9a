"""What a family is to the loader: how to read its config, which model to build, how its tensors are named."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import CausalLM, ModelConfig


@dataclass(frozen=True)
class Traits:
    """How the family differs from Llama, one short phrase per column of `mlxfam families`."""

    fused_qkv: str = "no"
    biases: str = "none"
    norm: str = "RMSNorm"
    activation: str = "SwiGLU"
    positions: str = "RoPE half-split"
    attention: str = "MHA/GQA"
    head: str = "untied"
    scalings: str = "-"
    tokenizer: str = "SentencePiece"


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]  # config.json `model_type` values this family loads
    architectures: tuple[str, ...]  # config.json `architectures` values this family loads
    config: Callable[[dict], ModelConfig]  # HF config.json -> ModelConfig
    model_class: type[CausalLM]
    sanitize: Callable[[dict, ModelConfig], dict]  # checkpoint tensors -> this model's parameter names
    traits: Traits = Traits()
    # Where one architecture name covers several families (ChatGLM-6B vs ChatGLM2/3): does this config belong here?
    matches: Callable[[dict], bool] = lambda hf_config: True
