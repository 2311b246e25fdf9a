"""Everything mlxfam knows about a family, in one record: how to read its config, which model to build, how its
tensors are named (in HF checkpoints and GGUF files), how its repositories tokenize and build chat prompts, and how
`mlxfam convert` writes it. The generic modules (loader, tokenizer, convert, gguf) ask the registry for these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat_formats import ChatFormat
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary
from ..tokenizer.tiktoken_vocab import TiktokenDefinition
from .base import CausalLM, ModelConfig

if TYPE_CHECKING:
    from ..gguf import ArchitectureMetadata


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
class TokenizerRules:
    """How the family's repositories tokenize where the generic reading of their files falls short: what their
    tokenizer and chat code (never run) does, restated. A family needing nothing declares nothing."""

    remote_classes: tuple[str, ...] = ()  # tokenizer_class names (tokenizer_config.json, auto_map) implemented here
    vocabulary_files: tuple[str, ...] = ()  # file names in a model directory that identify this family's tokenizer
    tiktoken: tuple[TiktokenDefinition, ...] = ()  # tiktoken files its code builds on, read wherever they appear
    # The native builder, for a tokenizer the generic reading cannot rebuild; None when its files are missing.
    read: Callable[[TokenizerSource], tuple[Vocabulary, FileDefaults] | None] | None = None
    chat_format: ChatFormat | None = None  # its chat() prompt, for repositories without a jinja template
    stop_tokens: tuple[str, ...] = ()  # further tokens its chat() ends on (the vocabulary must have them)
    # Per-repository chat settings (generation_config.json values, token spellings) -> the adjusted defaults.
    chat_settings: Callable[[Vocabulary, FileDefaults, TokenizerSource], FileDefaults] | None = None


@dataclass(frozen=True)
class MlxLmLayout:
    """The family is exported in mlx-lm's layout (mlx-lm's parameter names are mlxfam's)."""

    # config.json model_type values mlx-lm knows under another name.
    model_type_renames: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GgufNames:
    """How llama.cpp writes the family in a GGUF file."""

    architecture: str  # general.architecture
    layer_names: Mapping[str, str]  # blk.N.<name> -> the HF name under model.layers.N.
    global_names: Mapping[str, str]  # <name> -> the HF name
    # <name> of the projections llama.cpp permuted for its interleaved rotary -> the config key of their head count.
    permuted_heads: Mapping[str, str]
    # (the file's `<architecture>.<key>` fields, its tensors, the file) -> the HF config.json dict.
    config: Callable[[ArchitectureMetadata, dict, Path], dict]
    # <name> of the tensors llama.cpp keeps fused -> (the HF config -> the HF names of its row blocks: row counts).
    fused: Mapping[str, Callable[[dict], Mapping[str, int]]] = field(default_factory=dict)


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
    tokenizer: TokenizerRules = TokenizerRules()
    mlx_lm: MlxLmLayout | None = None  # None: `mlxfam convert` writes mlxfam's own parameter names
    gguf: GgufNames | None = None  # None: no GGUF reading for this family
