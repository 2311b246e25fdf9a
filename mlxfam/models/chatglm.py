"""ChatGLM-6B (v1): GLM's 2D rotary positions over a `tokens [gMASK] <sop>` prompt whose prefix is
bidirectional, DeepNorm residuals around LayerNorms with bias, an un-gated GELU MLP and a head tied to
the embeddings.

The first forward reads the prompt layout (where [gMASK] and <sop> are) and keeps it in each layer
cache's `family_state`; later steps take their 2D positions from it and the cache offset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..chat_formats import ChatFormat, rounds, split_system
from ..errors import MlxfamError
from ..kernels.rope import rope_qk
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary, token_id_of
from ..tokenizer.spm_vocab import sentencepiece_processor, sentencepiece_vocabulary
from .base import MLP, Attention, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .family import Family, TokenizerRules, Traits
from .rope import RopeConfig

# The original builds every block with its default num_layers=28, whatever the config says.
ALPHA = math.sqrt(2 * 28)


@dataclass(frozen=True)
class ChatGLMConfig(ModelConfig):
    sop_id: int = 0  # <sop> (config bos_token_id): the generated block starts there
    mask_id: int = 0  # [MASK]
    gmask_id: int = 0  # [gMASK]


def chatglm_config(hf: dict) -> ChatGLMConfig:
    if not hf.get("position_encoding_2d", True):
        raise MlxfamError("config.json: position_encoding_2d false (1D positions) is not supported for ChatGLM-6B")
    if hf.get("quantization_bit"):
        raise MlxfamError(
            f"config.json: quantization_bit {hf['quantization_bit']} (ChatGLM's own int4/int8) is not supported"
        )
    if hf.get("pre_seq_len") is not None:
        raise MlxfamError("config.json: pre_seq_len (a P-tuning v2 prefix) is not supported")
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    if hidden % heads:
        raise MlxfamError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    head_dim = hidden // heads
    return ChatGLMConfig(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(hf, "num_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=hf.get("inner_hidden_size") or 4 * hidden,
        norm_eps=hf.get("layernorm_epsilon", 1e-5),
        rope=RopeConfig(dims=head_dim // 2, base=10000.0),  # per half of the head
        max_position_embeddings=hf.get("max_sequence_length"),
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        norm="layer",
        activation="gelu_tanh",
        # The March-2023 configs lack the mask ids; these are the original configuration's defaults.
        sop_id=require(hf, "bos_token_id"),
        mask_id=hf.get("mask_token_id", 150000),
        gmask_id=hf.get("gmask_token_id", 150001),
    )


def prompt_layout(ids: np.ndarray, cfg: ChatGLMConfig) -> dict:
    """Where the generated block of `tokens [gMASK] <sop>` starts, found as the original does: the
    first [gMASK] (else the first [MASK]) is the mask position, the first <sop> the context length."""
    layouts = []
    for row in np.asarray(ids).tolist():
        mask_id = cfg.gmask_id if cfg.gmask_id in row else cfg.mask_id
        if mask_id not in row or cfg.sop_id not in row:
            raise MlxfamError(
                f"a ChatGLM-6B prompt must end with [gMASK] <sop> (ids {cfg.gmask_id}, {cfg.sop_id}; the tokenizer "
                f"adds them); this one has no {'[gMASK]/[MASK]' if mask_id not in row else '<sop>'}"
            )
        layouts.append({"mask_position": row.index(mask_id), "context_length": row.index(cfg.sop_id)})
    if any(layout != layouts[0] for layout in layouts):
        raise MlxfamError(f"the rows of a ChatGLM-6B batch must have [gMASK] and <sop> at the same places: {layouts}")
    return layouts[0]


def position_ids(start: int, length: int, layout: dict) -> np.ndarray:
    """(2, length) positions of tokens start..start+length-1: the context counts 0, 1, ... with block
    position 0; from <sop> on, every token sits at the mask position with block positions 1, 2, ..."""
    index = np.arange(start, start + length)
    in_context = index < layout["context_length"]
    positions = np.where(in_context, index, layout["mask_position"])
    block_positions = np.where(in_context, 0, index - layout["context_length"] + 1)
    return np.stack([positions, block_positions])


def rotary_cos_sin(positions: mx.array, inv_freq: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """cos/sin of positions x inv_freq as the ChatGLM originals build their tables: the products in the
    model dtype (their table follows the inv_freq buffer, which `.half()` / `.float()` convert)."""
    angles = (positions.astype(dtype)[..., None] * inv_freq.astype(dtype)).astype(mx.float32)
    return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)


class ChatGLMAttention(Attention):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__(cfg)
        dims = cfg.rope.dims
        inv_freq = 1.0 / np.float32(cfg.rope.base) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims))
        self._inv_freq = mx.array(inv_freq.astype(np.float16))  # the original rounds it to fp16

    def rotate(self, q: mx.array, k: mx.array, cache) -> tuple[mx.array, mx.array]:
        """2D rotary: the first half of each head turns with the positions, the second with the block
        positions, each half-split (rotate_half) within its half."""
        positions = mx.array(position_ids(cache.offset, q.shape[2], cache.family_state))
        cos, sin = rotary_cos_sin(positions[:, None], self._inv_freq, q.dtype)  # (2 halves, 1, L, dims/2)
        return rope_qk(q, k, cos, sin, rotary_dims=self.rope.cfg.dims, interleaved=False, two_d=True)


class ChatGLMBlock(DecoderLayer):
    attention_class = ChatGLMAttention
    mlp_class = MLP

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        # DeepNorm: the residual is the normalised input, scaled.
        attention_input = self.input_layernorm(x)
        h = attention_input * ALPHA + self.self_attn(attention_input, mask, cache)
        mlp_input = self.post_attention_layernorm(h)
        return mlp_input * ALPHA + self.mlp(mlp_input)


class ChatGLMModel(DecoderModel):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__(cfg, ChatGLMBlock)
        self.cfg = cfg

    def embed(self, inputs: mx.array, cache: list) -> mx.array:
        # Only the first forward reads the ids (a host copy); decode steps use the kept layout.
        if cache[0].offset == 0:
            layout = prompt_layout(np.array(inputs), self.cfg)
            for layer_cache in cache:
                layer_cache.family_state.update(layout)
        elif "context_length" not in cache[0].family_state:
            raise MlxfamError("this cache holds tokens but no ChatGLM-6B prompt layout; start from a fresh cache")
        return self.embed_tokens(inputs)

    def make_mask(self, inputs: mx.array, cache, window: int | None):
        """Causal, except that in the first forward the context before <sop> is visible to every query."""
        mask = super().make_mask(inputs, cache, window)
        length = inputs.shape[1]
        if cache.offset or length == 1:
            return mask  # later tokens continue the generated block: causal over the cache
        keys = cache.key_positions(length)
        queries = np.arange(length)[:, None]
        prefix_ahead = mx.array((keys < cache.family_state["context_length"]) & (keys > queries))
        causal = mx.array(keys <= queries) if isinstance(mask, str) else mask
        return mx.logical_or(causal, prefix_ahead)


class ChatGLMForConditionalGeneration(CausalLM):
    whole_prompt_prefill = True  # the layout and the bidirectional prefix need the whole prompt

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__(cfg, ChatGLMModel(cfg))

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        # Positions live in the cache's family_state, so a call without a cache gets a fresh one.
        return super().__call__(inputs, cache if cache is not None else self.make_cache())


def split_per_head(name: str, tensor: mx.array, heads: int, head_dim: int) -> list[mx.array]:
    """q, k, v of a query_key_value whose rows are grouped per head: [q_h; k_h; v_h] for each head h."""
    if tensor.shape[0] != heads * 3 * head_dim:
        raise MlxfamError(f"{name}: {tensor.shape[0]} rows, expected {heads} heads x 3 x {head_dim}")
    rest = tensor.shape[1:]
    grouped = tensor.reshape(heads, 3, head_dim, *rest)
    return [grouped[:, i].reshape(heads * head_dim, *rest) for i in range(3)]


_TOP_LEVEL = {
    "transformer.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.final_layernorm.weight": "model.norm.weight",
    "transformer.final_layernorm.bias": "model.norm.bias",
}
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "attention.dense": "self_attn.o_proj",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def sanitize(weights: dict, cfg: ChatGLMConfig) -> dict:
    _check_tied_head(weights)
    out = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
            continue  # the tied head's copy (checked above); a buffer the original recomputes
        layer = _LAYER.fullmatch(name)
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = tensor
        elif layer and layer[2] == "attention.query_key_value":
            parts = split_per_head(name, tensor, cfg.num_heads, cfg.head_dim)
            out.update({f"model.layers.{layer[1]}.self_attn.{p}_proj.{layer[3]}": t for p, t in zip("qkv", parts)})
        elif layer and layer[2] in _LAYER_NAMES:
            out[f"model.layers.{layer[1]}.{_LAYER_NAMES[layer[2]]}.{layer[3]}"] = tensor
        else:
            out[name] = tensor  # the loader reports it as unexpected (or it already has our name)
    return out


def _check_tied_head(weights: dict):
    """The original ties lm_head to the embeddings (its config has no tie_word_embeddings key), so a
    shipped lm_head.weight is a copy; one that differs would make the tied logits silently wrong."""
    head, embedding = weights.get("lm_head.weight"), weights.get("transformer.word_embeddings.weight")
    if head is None or embedding is None:
        return
    if head.shape != embedding.shape or not mx.array_equal(head, embedding).item():
        raise MlxfamError(
            "lm_head.weight differs from transformer.word_embeddings.weight; ChatGLM-6B ties the head to the "
            "embeddings, so this checkpoint is not one mlxfam can run faithfully"
        )


def is_chatglm1(hf: dict) -> bool:
    return "position_encoding_2d" in hf or "inner_hidden_size" in hf


# --- tokenizer: ice_text.model, as tokenization_chatglm.py reads it, and the chat prompt of chat() -------------

# SPTokenizer writes these for whitespace before SentencePiece sees the text (max_blank_length 80).
_ICETK_WHITESPACE = {"<n>": "\n", "<|tab|>": "\t"} | {f"<|blank_{n}|>": " " * n for n in range(2, 81)}


def _icetk_text(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return re.sub(" {2,80}", lambda run: f"<|blank_{len(run.group())}|>", text)


def read_tokenizer(source: TokenizerSource) -> tuple[Vocabulary, FileDefaults] | None:
    """ice_text.model (None without it): whitespace written as <n>, <|tab|>, <|blank_n|> before SentencePiece (and
    back when decoding), ids shifted past `num_image_tokens` image tokens, [gMASK] <sop> appended to a text."""
    file, config, config_file = source.path / "ice_text.model", source.config, source.config_file
    if not file.is_file():
        return None
    for flag in ("remove_space", "do_lower_case"):
        if config.get(flag):
            raise MlxfamError(f"{config_file}: {flag} true is not supported (ChatGLM-6B ships false)")
    offset = config.get("num_image_tokens", 20000)  # the tokenizer's default; the final release sets 0
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise MlxfamError(f"{config_file}: num_image_tokens must be a non-negative int, got {offset!r}")
    processor = sentencepiece_processor(file.read_bytes(), str(file))
    text = sentencepiece_vocabulary(processor)
    pieces = list(text.pieces)
    for token, replacement in _ICETK_WHITESPACE.items():
        if token in text.vocab:
            pieces[text.vocab[token]] = replacement.encode()
    vocabulary = Vocabulary(
        encode_ordinary=lambda s: [offset + i for i in processor.encode(_icetk_text(s))],
        pieces=[b""] * offset + pieces,  # image tokens decode to nothing
        vocab={token: offset + i for token, i in text.vocab.items()},
        specials={token: offset + i for token, i in text.specials.items()},
        special_ids=frozenset(offset + i for i in text.special_ids),
        strip_leading_space=text.strip_leading_space,
    )
    gmask = token_id_of(vocabulary, config.get("gmask_token", "[gMASK]"), f"{config_file}: gmask_token")
    sop = token_id_of(vocabulary, config.get("bos_token", "<sop>"), f"{config_file}: bos_token")
    return vocabulary, FileDefaults(
        bos_id=sop,
        eos_id=token_id_of(vocabulary, config.get("eos_token", "<eop>"), f"{config_file}: eos_token"),
        suffix_ids=[gmask, sop],
    )


def glm_rounds(history, query, *, first_round: int, sep: str) -> str:
    """ "[Round i]{sep}问：…{sep}答：…{sep}" per (question, answer), a trailing question's round ending at "答："."""
    text = "".join(f"[Round {first_round + i}]{sep}问：{q}{sep}答：{a}{sep}" for i, (q, a) in enumerate(history))
    if query is not None:
        text += f"[Round {first_round + len(history)}]{sep}问：{query}{sep}答："
    return text


def chat_prompt(tokenizer, messages, add_generation_prompt) -> str:
    """`chat()`: the bare query on the first turn, then "[Round i]\\n问：…\\n答：…" from round 0; a trailing
    question's round ends with "答：", which opens the answer."""
    _, turns = split_system(messages, "ChatGLM-6B", ("user", "assistant"), takes_system=False)
    history, query = rounds(turns, "ChatGLM-6B")
    if not history and query is not None:
        return query
    return glm_rounds(history, query, first_round=0, sep="\n")


# ChatGLMTokenizer is also ChatGLM2/3's class: with no ice_text.model, chatglm2's rules read the directory.
TOKENIZER = TokenizerRules(
    remote_classes=("ChatGLMTokenizer",),
    vocabulary_files=("ice_text.model",),
    read=read_tokenizer,
    chat_format=ChatFormat("chatglm1", chat_prompt),
)


FAMILY = Family(
    name="chatglm",
    description="ChatGLM-6B (v1)",
    model_types=("chatglm",),
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    config=chatglm_config,
    model_class=ChatGLMForConditionalGeneration,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="query_key_value, per head",
        biases="all linears and norms",
        norm="LayerNorm; DeepNorm residual x sqrt(56)",
        activation="GELU (tanh), un-gated",
        positions="2D RoPE: position + block position",
        attention="MHA; bidirectional prefix before <sop>",
        head="tied",
        tokenizer="SentencePiece (icetk)",
    ),
    matches=is_chatglm1,
    tokenizer=TOKENIZER,
)
