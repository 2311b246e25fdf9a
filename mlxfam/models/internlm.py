"""InternLM 1 (`InternLMForCausalLM`, remote code: internlm-7b, -20b): Llama with biases on q/k/v/o
(config `bias`, default true) and the rotary variant its `rotary` field names (docs/families.md#internlm):

- "origin" (also a config without `rotary`, as the early code has no such field): fixed base;
- "dynamic": the later code caches keys un-rotated and, at every step, rotates all of them with the
  table for the current total length L, whose base grows past max_position_embeddings:
  base * (f * L / max_pos - (f - 1))^(d/(d-2)). Below max_pos this equals a cache of rotated keys.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..attention import attend
from ..chat_formats import ChatFormat, split_system
from ..errors import MlxfamError
from ..kernels.rope import rope
from .base import Attention, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .family import Family, TokenizerRules, Traits
from .llama import llama_config, sanitize
from .rope import RopeConfig

_ROTARY_TYPES = {"origin": "default", "dynamic": "dynamic"}  # InternLM's name -> rope.py's


def internlm_config(hf: dict) -> ModelConfig:
    rotary = hf.get("rotary") or {"type": "origin", "base": 10000}
    if rotary.get("type") not in _ROTARY_TYPES or "base" not in rotary:
        raise MlxfamError(
            f"config.json: rotary {rotary!r} is not supported (needs 'base' and a 'type' of {', '.join(_ROTARY_TYPES)})"
        )
    max_positions = hf.get("max_position_embeddings", 2048)  # InternLMConfig's default
    rope = RopeConfig(
        dims=require(hf, "hidden_size") // require(hf, "num_attention_heads"),
        base=float(rotary["base"]),
        rope_type=_ROTARY_TYPES[rotary["type"]],
        scaling={"factor": rotary.get("scaling_factor", 1.0)} if rotary["type"] == "dynamic" else {},
        max_position_embeddings=max_positions,
    )
    return llama_config(hf, attention_bias=hf.get("bias", True), rope=rope, max_position_embeddings=max_positions)


class DynamicRotaryAttention(Attention):
    """The later code's dynamic rotary: the cache holds un-rotated keys, rotated again every step."""

    def rotate(self, q: mx.array, k: mx.array, cache) -> tuple[mx.array, mx.array]:
        return q, k  # both are rotated in `attend`, once the cache has handed back every key

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        length = q.shape[2]
        offset = cache.offset if cache is not None else 0
        positions = cache.key_positions(length) if cache is not None else np.arange(length)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        q = self.rope(q, offset)
        # keys at their own positions (any order: a rotating cache's slots), with this step's table
        cos, sin = self.rope.tables(mx.array(positions, dtype=mx.int32)[None], offset + length)
        k = rope(k, cos, sin, rotary_dims=self.rope.cfg.dims, interleaved=False)
        return attend(q, k, v, scale=self.scale, mask=mask, softcap=self.softcap)


class DynamicRotaryDecoderLayer(DecoderLayer):
    attention_class = DynamicRotaryAttention


class InternLMForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        dynamic = cfg.rope.rope_type == "dynamic"
        super().__init__(cfg, DecoderModel(cfg, DynamicRotaryDecoderLayer if dynamic else DecoderLayer))
        # Past max_position_embeddings every hidden state depends on the length the first forward
        # sees; the original's generate gives it the whole prompt.
        self.whole_prompt_prefill = dynamic


def chat_prompt(tokenizer, messages, add_generation_prompt) -> str:
    """`build_inputs`: "<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n", the prompt ending at "<|Bot|>:"."""
    _, turns = split_system(messages, "InternLM", ("user", "assistant"), takes_system=False)
    text = "".join(
        f"<|User|>:{m['content']}<eoh>\n" if m["role"] == "user" else f"<|Bot|>:{m['content']}<eoa>\n" for m in turns
    )
    return text + "<|Bot|>:" if add_generation_prompt else text


TOKENIZER = TokenizerRules(
    remote_classes=("InternLMTokenizer",),
    chat_format=ChatFormat("internlm", chat_prompt),
    stop_tokens=("<eoa>", "<eoh>"),
)


FAMILY = Family(
    name="internlm",
    description="InternLM 1 (7B, 20B)",
    model_types=("internlm",),
    architectures=("InternLMForCausalLM",),
    config=internlm_config,
    model_class=InternLMForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        biases="q/k/v/o (config bias)",
        attention="MHA",
        scalings="rotary dynamic: un-rotated key cache, re-rotated each step",
    ),
    tokenizer=TOKENIZER,
)
