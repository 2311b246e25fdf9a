"""Qwen 1 (`QWenLMHeadModel`, remote code): Llama with a fused, biased `c_attn` [q; k; v], the MLP
c_proj(w1(x) * silu(w2(x))), and two inference-time length extensions (docs/families.md#qwen-1):

- dynamic NTK: the rotary base becomes base * alpha^(d/(d-2)), with alpha taken once from the
  length of the first forward (the prompt) and reused by every later step of the sequence;
- logn attention: the query at 0-based position p is scaled by log(p+1)/log(seq_length) past seq_length.

Both Dec-2023 field names (hidden_size, ...) and Aug-2023 ones (n_embd, n_head, ...) are read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from ..chat_formats import ChatFormat, split_system
from ..errors import MlxfamError
from ..kernels.rope import rope_qk, rope_table
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary
from ..tokenizer.split_patterns import SINGLE_DIGIT_SPLIT
from ..tokenizer.tiktoken_vocab import TiktokenDefinition
from .base import Attention, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .family import Family, TokenizerRules, Traits
from .rope import RopeConfig, default_inv_freq


@dataclass(frozen=True)
class QwenConfig(ModelConfig):
    seq_length: int = 8192  # the trained length NTK alpha and logn scaling are measured against
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True


def qwen_config(hf: dict) -> QwenConfig:
    if hf.get("use_cache_quantization"):
        raise MlxfamError("config.json: use_cache_quantization true is not supported (it quantizes the KV cache)")
    hidden = require(hf, "hidden_size", "n_embd")
    heads = require(hf, "num_attention_heads", "n_head")
    head_dim = require(hf, "kv_channels")
    if head_dim * heads != hidden:
        # The original splits c_attn every hidden_size rows and reshapes by hidden_size // heads.
        raise MlxfamError(
            f"config.json: kv_channels ({head_dim}) x num_attention_heads ({heads}) must equal hidden_size ({hidden})"
        )
    rotary_pct = hf.get("rotary_pct", 1.0)
    rotary_dims = head_dim if rotary_pct == 1.0 else int(head_dim * rotary_pct)
    if not 0 < rotary_pct <= 1 or rotary_dims < 4 or rotary_dims % 2:
        raise MlxfamError(f"config.json: rotary_pct {rotary_pct} gives {rotary_dims} rotary dims of {head_dim}")
    no_bias = hf.get("no_bias", True)
    return QwenConfig(
        vocab_size=require(hf, "vocab_size", "padded_vocab_size"),
        hidden_size=hidden,
        num_layers=require(hf, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=require(hf, "intermediate_size", "ffn_hidden_size") // 2,  # w1 and w2 each get half
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        rope=RopeConfig(dims=rotary_dims, base=float(hf.get("rotary_emb_base", 10000))),
        max_position_embeddings=require(hf, "max_position_embeddings", "n_positions"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=True,  # c_attn always has a bias; c_proj and the MLP only without no_bias
        o_proj_bias=not no_bias,
        mlp_bias=not no_bias,
        seq_length=require(hf, "seq_length"),
        use_dynamic_ntk=hf.get("use_dynamic_ntk", True),  # the Dec-2023 QWenConfig defaults
        use_logn_attn=hf.get("use_logn_attn", True),
    )


class QwenAttention(Attention):
    def __init__(self, cfg: QwenConfig):
        super().__init__(cfg)
        self.seq_length = cfg.seq_length
        self.use_dynamic_ntk = cfg.use_dynamic_ntk
        self.use_logn_attn = cfg.use_logn_attn

    def ntk_alpha(self, length: int, cache) -> int:
        """Taken from the first forward's length, then kept in the cache for the rest of the sequence."""
        if not self.use_dynamic_ntk:
            return 1
        if cache is not None and cache.offset > 0:
            return cache.family_state["ntk_alpha"]
        # math.log(x, 2) as the original writes it: at some powers of two it rounds above math.log2.
        alpha = max(2 ** math.ceil(math.log(length / self.seq_length, 2) + 1) - 1, 1)
        if cache is not None:
            cache.family_state["ntk_alpha"] = alpha
        return alpha

    def rotate(self, q: mx.array, k: mx.array, cache) -> tuple[mx.array, mx.array]:
        offset = cache.offset if cache is not None else 0
        dims = self.rope.cfg.dims
        base = self.rope.cfg.base * self.ntk_alpha(q.shape[2], cache) ** (dims / (dims - 2))
        inv_freq = default_inv_freq(dims, base).astype(np.float32)
        cos, sin = rope_table(mx.arange(offset, offset + q.shape[2])[None], inv_freq)
        q, k = rope_qk(q, k, cos, sin, rotary_dims=dims, interleaved=False)
        return self.logn_scaled(q, offset), k

    def logn_scaled(self, q: mx.array, offset: int) -> mx.array:
        end = offset + q.shape[2]
        if not self.use_logn_attn or end <= self.seq_length:
            return q
        counts = np.arange(offset + 1, end + 1)  # p + 1 for each query position p
        scale = np.maximum(np.log(counts) / math.log(self.seq_length), 1.0)
        return q * mx.array(scale[:, None], dtype=q.dtype)


class QwenDecoderLayer(DecoderLayer):
    attention_class = QwenAttention


class QWenLMHeadModel(CausalLM):
    whole_prompt_prefill = True  # the NTK alpha of the whole sequence comes from the first forward's length

    def __init__(self, cfg: QwenConfig):
        super().__init__(cfg, DecoderModel(cfg, QwenDecoderLayer))


_NAME = re.compile(r"transformer\.(?:h\.(\d+)\.)?(.+)\.(weight|bias)")
_RENAMES = {
    "wte": "embed_tokens",
    "ln_f": "norm",
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.up_proj",  # c_proj(w1(x) * silu(w2(x))): w2 is the gate
    "mlp.w2": "mlp.gate_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith(("rotary_emb.inv_freq", "attn.masked_bias")):
            continue  # buffers; the rotary table is recomputed
        match = _NAME.fullmatch(name)
        if match is None:  # lm_head (dropped when tied), or an unknown name the loader reports
            if not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                out[name] = tensor
            continue
        layer, module, kind = match.groups()
        prefix = "model." if layer is None else f"model.layers.{layer}."
        if module == "attn.c_attn":
            # Rows [q; k; v]; wrong sizes surface in the loader's shape check.
            parts = mx.split(tensor, [cfg.hidden_size, 2 * cfg.hidden_size], axis=0)
            out.update({f"{prefix}self_attn.{proj}_proj.{kind}": part for proj, part in zip("qkv", parts)})
        else:
            out[f"{prefix}{_RENAMES.get(module, module)}.{kind}"] = tensor
    return out


# --- tokenizer: qwen.tiktoken, run as tokenization_qwen.py does, and the chat prompt of make_context ----------

TIKTOKEN = TiktokenDefinition(
    name="Qwen 1",
    file_name="qwen.tiktoken",
    n_ranks=151643,
    pattern=SINGLE_DIGIT_SPLIT,  # tokenization_qwen.py PAT_STR; Qwen 1.5/2's tokenizer.json uses the same one
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))),
    bos=None,
    eos="<|endoftext|>",
    stops=("<|im_end|>", "<|im_start|>"),  # docs/families.md#qwen-1: chat stop words
    nfc=True,
)
# `chat(system=...)`'s default (modeling_qwen.py).
DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_prompt(tokenizer, messages, add_generation_prompt) -> list[int]:
    """`make_context` (chatml): blocks "<|im_start|>{role}\\n{content}<|im_end|>" joined by "\\n", the system
    block first. Role and content are encoded separately, special-token text in them as plain text."""
    system, turns = split_system(messages, "Qwen", ("user", "assistant"))
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    newline = tokenizer.encode_ordinary("\n")

    def block(role: str, content: str) -> list[int]:
        return [im_start, *tokenizer.encode_ordinary(role), *newline, *tokenizer.encode_ordinary(content), im_end]

    ids = block("system", DEFAULT_SYSTEM if system is None else system)
    for message in turns:
        ids += newline + block(message["role"], message["content"])
    if add_generation_prompt:
        ids += [*newline, im_start, *tokenizer.encode_ordinary("assistant"), *newline]
    return ids


def chat_settings(vocabulary: Vocabulary, defaults: FileDefaults, source: TokenizerSource) -> FileDefaults:
    """generation_config.json's chat_format: "chatml" chats, a "raw" (base) model has no chat prompt. The ChatML
    stop tokens come with qwen.tiktoken either way."""
    mode = source.json("generation_config.json").get("chat_format", "chatml")
    if mode not in ("chatml", "raw"):
        raise MlxfamError(
            f"{source.path / 'generation_config.json'}: chat_format {mode!r} is not supported ('chatml' or 'raw')"
        )
    return defaults if mode == "chatml" else replace(defaults, chat_format=None)


TOKENIZER = TokenizerRules(
    remote_classes=("QWenTokenizer",),
    vocabulary_files=("qwen.tiktoken",),
    tiktoken=(TIKTOKEN,),
    chat_format=ChatFormat("qwen", chat_prompt),
    chat_settings=chat_settings,
)


FAMILY = Family(
    name="qwen",
    description="Qwen 1 (Qwen-7B, -14B, -Chat)",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    config=qwen_config,
    model_class=QWenLMHeadModel,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="c_attn [q; k; v]",
        biases="q/k/v (c_proj, MLP: unless no_bias)",
        activation="SwiGLU (w2 gate, w1 up)",
        attention="MHA",
        scalings="dynamic NTK (alpha from the prompt), logn attention",
        tokenizer="tiktoken BPE",
    ),
    tokenizer=TOKENIZER,
)
