"""MiniCPM (1B/2B): Llama with muP-style scalings of the embeddings, residual branches and logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from ..chat_formats import ChatFormat
from ..errors import MlxfamError
from ..gguf import ArchitectureMetadata
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary
from .base import CausalLM, DecoderLayer, DecoderModel, ModelConfig
from .family import Family, TokenizerRules, Traits
from .llama import GGUF as LLAMA_GGUF
from .llama import gguf_config as llama_gguf_config
from .llama import llama_config, sanitize

ROPE_TYPES = ("default", "linear", "dynamic")  # what MiniCPMConfig accepts


@dataclass(frozen=True)
class MiniCPMConfig(ModelConfig):
    residual_scale: float = 1.0  # scale_depth / sqrt(num_layers), on both residual branches
    logits_divisor: float = 1.0  # hidden_size / dim_model_base, on the final hidden state


def minicpm_config(hf: dict) -> MiniCPMConfig:
    # MiniCPMConfig's defaults: the original reads these even when config.json leaves them out.
    llama = llama_config(
        {"max_position_embeddings": 2048, "tie_word_embeddings": True, **hf},
        embedding_scale=float(hf.get("scale_emb", 1)),
    )
    if llama.rope.rope_type not in ROPE_TYPES:
        raise MlxfamError(
            f"config.json: rope_scaling type {llama.rope.rope_type!r} is not supported by MiniCPM "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    return MiniCPMConfig(
        **vars(llama),
        residual_scale=hf.get("scale_depth", 1) / math.sqrt(llama.num_layers),
        logits_divisor=llama.hidden_size / hf.get("dim_model_base", 1),
    )


class MiniCPMDecoderLayer(DecoderLayer):
    def __init__(self, cfg: MiniCPMConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.residual_scale = cfg.residual_scale

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


class MiniCPMForCausalLM(CausalLM):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__(cfg, DecoderModel(cfg, MiniCPMDecoderLayer))

    def logits(self, h: mx.array) -> mx.array:
        # The original divides before the head whether or not it is tied (mlx-lm only when untied).
        return super().logits(h / self.config.logits_divisor)


def chat_prompt(tokenizer, messages, add_generation_prompt) -> str:
    """The template MiniCPM ships: "<用户>{q}<AI>" per user turn, any other turn's text as is, both stripped."""
    return "".join(
        f"<用户>{m['content'].strip()}<AI>" if m["role"] == "user" else m["content"].strip() for m in messages
    )


def chat_settings(vocabulary: Vocabulary, defaults: FileDefaults, source: TokenizerSource) -> FileDefaults:
    """Its chat() cuts the reply at the next <用户> or <AI>, where the vocabulary has them."""
    stops = [vocabulary.vocab[token] for token in ("<用户>", "<AI>") if token in vocabulary.vocab]
    return replace(defaults, stop_ids=[*defaults.stop_ids, *stops])


TOKENIZER = TokenizerRules(
    # chat() renders the repository's template to text and tokenizes that with BOS.
    chat_format=ChatFormat("minicpm", chat_prompt, uses_template=True),
    chat_settings=chat_settings,
)


def gguf_config(field: ArchitectureMetadata, tensors: dict, path: Path) -> dict:
    """A minicpm-architecture GGUF: Llama's fields plus the three scalings, with llama.cpp's defaults where the
    file leaves one out (those of MiniCPM-2B, and a logit scale of 256 / hidden size)."""
    config = llama_gguf_config(field, tensors, path)
    if "num_local_experts" in config:
        raise MlxfamError(f"{path}: MiniCPM with experts (minicpm.expert_count) is not supported")
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    residual_scale = float(field("residual_scale", 1.4 / math.sqrt(layers)))
    return {
        **config,
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "scale_emb": float(field("embedding_scale", 12.0)),
        "scale_depth": residual_scale * math.sqrt(layers),
        # llama.cpp divides the logits by logit_scale; the original divides h by hidden_size / dim_model_base.
        "dim_model_base": hidden / float(field("logit_scale", 256.0 / hidden)),
    }


# Llama's tensor names; the converter permutes q and k rows as it does for Llama.
GGUF = replace(LLAMA_GGUF, architecture="minicpm", config=gguf_config)


FAMILY = Family(
    name="minicpm",
    description="MiniCPM 1B/2B",
    model_types=("minicpm",),
    architectures=("MiniCPMForCausalLM",),
    config=minicpm_config,
    model_class=MiniCPMForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        head="tied (128k: untied)",
        scalings="embed x scale_emb; residuals x scale_depth/sqrt(L); logits of h/(H/dim_model_base)",
    ),
    tokenizer=TOKENIZER,
    gguf=GGUF,
)
