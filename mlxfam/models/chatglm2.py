"""ChatGLM2-6B and ChatGLM3-6B: a fused query_key_value [q; k; v] with
multi-query groups, RoPE on the first half of each head in interleaved pairs, RMSNorm and a fused
SwiGLU dense_h_to_4h [gate; up].

The two share their config keys, architecture and tokenizer.model; only the repository name recorded in the
configs tells them apart (`chatglm_version`, used by the model config and the tokenizer alike). The model differs
in two rotary details: ChatGLM2's code builds its rotary table in the model dtype (in fp16, positions past 2048
are no longer integers) and its rope_ratio divides the positions (chatglm2-6b-32k); ChatGLM3's table is fp32 and
its rope_ratio multiplies the base. The tokenizer differs in its appended role tokens and chat prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..chat_formats import ChatFormat, rounds, split_system
from ..errors import MlxfamError
from ..kernels.rope import rope_qk
from ..tokenizer.core import (
    FileDefaults,
    TokenizerSource,
    Vocabulary,
    added_tokens,
    with_added_tokens,
    with_appended_tokens,
)
from ..tokenizer.spm_vocab import sentencepiece_processor, sentencepiece_vocabulary
from .base import Attention, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .chatglm import glm_rounds, rotary_cos_sin, split_per_head
from .family import Family, TokenizerRules, Traits
from .rope import RopeConfig

_CHATGLM2_NAMES = ("chatglm2", "codegeex2")
_CHATGLM3_NAMES = ("chatglm3", "glm-4", "glm4")  # GLM-4's code scales the base by rope_ratio as ChatGLM3's does
# Values the original code reads but mlxfam implements only as the released checkpoints set them.
_FIXED = {"apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "fp32_residual_connection": False}


def chatglm_version(names: dict[str, object], where: str, why: str) -> int:
    """2 or 3, from the repository names recorded in the configs (`names`: field -> value, in the order they
    are trusted); `where` and `why` (what depends on it) go into the error raised when no name tells."""
    for name in (str(value).lower() for value in names.values()):
        if any(n in name for n in _CHATGLM2_NAMES):
            return 2
        if any(n in name for n in _CHATGLM3_NAMES):
            return 3
    given = "; ".join(f"{field} {value!r}" for field, value in names.items())
    raise MlxfamError(
        f"{where}: cannot tell ChatGLM2 from ChatGLM3 ({why}): {given} names neither "
        f"(ChatGLM2: {', '.join(_CHATGLM2_NAMES)}; ChatGLM3: {', '.join(_CHATGLM3_NAMES)})"
    )


@dataclass(frozen=True)
class ChatGLM2Config(ModelConfig):
    qkv_per_head: bool = False  # without multi_query_attention the rows are [q_h; k_h; v_h] per head
    rope_table_in_model_dtype: bool = False  # ChatGLM2's code


def chatglm2_config(hf: dict) -> ChatGLM2Config:
    for key, value in _FIXED.items():
        if hf.get(key, value) != value:
            raise MlxfamError(f"config.json: {key} {hf[key]!r} is not supported (only {value!r})")
    if hf.get("quantization_bit"):
        raise MlxfamError(
            f"config.json: quantization_bit {hf['quantization_bit']} (ChatGLM's own int4/int8) is not supported"
        )
    if hf.get("pre_seq_len") is not None:
        raise MlxfamError("config.json: pre_seq_len (a P-tuning v2 prefix) is not supported")
    ratio = float(hf.get("rope_ratio", 1))
    why = (
        f"rope_ratio {ratio:g} divides positions in ChatGLM2 but multiplies the base in ChatGLM3, "
        "whose rotary table is fp32 where ChatGLM2's is in the model dtype"
    )
    chatglm2 = chatglm_version({"_name_or_path": hf.get("_name_or_path")}, "config.json", why) == 2
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    head_dim = hf.get("kv_channels") or hidden // heads
    multi_query = bool(hf.get("multi_query_attention"))
    add_bias_linear = bool(hf.get("add_bias_linear"))
    rope = RopeConfig(dims=head_dim // 2, base=10000.0 if chatglm2 else 10000.0 * ratio, traditional=True)
    if chatglm2 and ratio != 1:
        rope = RopeConfig(dims=rope.dims, traditional=True, rope_type="linear", scaling={"factor": ratio})
    return ChatGLM2Config(
        vocab_size=require(hf, "padded_vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=require(hf, "num_layers"),
        num_heads=heads,
        num_kv_heads=require(hf, "multi_query_group_num") if multi_query else heads,
        head_dim=head_dim,
        intermediate_size=require(hf, "ffn_hidden_size"),
        norm_eps=hf.get("layernorm_epsilon", 1e-5),
        rope=rope,
        max_position_embeddings=hf.get("seq_length"),
        attention_bias=add_bias_linear or bool(hf.get("add_qkv_bias")),
        mlp_bias=add_bias_linear,
        norm="rms" if hf.get("rmsnorm", True) else "layer",
        qkv_per_head=not multi_query,
        rope_table_in_model_dtype=chatglm2,
    )


class ChatGLM2Attention(Attention):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__(cfg)
        # `dense` has a bias only with add_bias_linear, like the MLP; add_qkv_bias covers q/k/v alone.
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.mlp_bias)
        self.table_in_model_dtype = cfg.rope_table_in_model_dtype

    def rotate(self, q: mx.array, k: mx.array, cache) -> tuple[mx.array, mx.array]:
        if not self.table_in_model_dtype or q.dtype == mx.float32:
            return super().rotate(q, k, cache)
        # ChatGLM2 in half precision: theta, the positions and their products are rounded to the dtype.
        dtype, rope = q.dtype, self.rope.cfg
        offset = cache.offset if cache is not None else 0
        theta = 1.0 / (mx.array(rope.base, dtype) ** (mx.arange(0, rope.dims, 2).astype(dtype) / rope.dims))
        positions = mx.arange(offset, offset + q.shape[2]).astype(dtype) / rope.scaling.get("factor", 1.0)
        cos, sin = rotary_cos_sin(positions[None], theta, dtype)  # (1, L, dims/2)
        return rope_qk(q, k, cos, sin, rotary_dims=rope.dims, interleaved=True)


class ChatGLM2Block(DecoderLayer):
    attention_class = ChatGLM2Attention


class ChatGLM2ForConditionalGeneration(CausalLM):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__(cfg, DecoderModel(cfg, ChatGLM2Block))


_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.encoder.final_layernorm.bias": "model.norm.bias",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "self_attention.dense": "self_attn.o_proj",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def _split_qkv(name: str, tensor: mx.array, cfg: ChatGLM2Config) -> list[mx.array]:
    if cfg.qkv_per_head:
        return split_per_head(name, tensor, cfg.num_heads, cfg.head_dim)
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if tensor.shape[0] != q_rows + 2 * kv_rows:
        raise MlxfamError(f"{name}: {tensor.shape[0]} rows, expected {q_rows} (q) + 2 x {kv_rows} (k, v)")
    return mx.split(tensor, [q_rows, q_rows + kv_rows], axis=0)


def sanitize(weights: dict, cfg: ChatGLM2Config) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # a buffer the original recomputes
        layer = _LAYER.fullmatch(name)
        prefix = f"model.layers.{layer[1]}." if layer else ""
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = tensor
        elif layer and layer[2] == "self_attention.query_key_value":
            parts = _split_qkv(name, tensor, cfg)
            out.update({f"{prefix}self_attn.{p}_proj.{layer[3]}": t for p, t in zip("qkv", parts)})
        elif layer and layer[2] == "mlp.dense_h_to_4h":
            if tensor.shape[0] != 2 * cfg.intermediate_size:
                raise MlxfamError(
                    f"{name}: {tensor.shape[0]} rows, expected 2 x ffn_hidden_size ({cfg.intermediate_size})"
                )
            gate, up = mx.split(tensor, 2, axis=0)
            out.update({f"{prefix}mlp.gate_proj.{layer[3]}": gate, f"{prefix}mlp.up_proj.{layer[3]}": up})
        elif layer and layer[2] in _LAYER_NAMES:
            out[f"{prefix}{_LAYER_NAMES[layer[2]]}.{layer[3]}"] = tensor
        else:
            out[name] = tensor  # the loader reports it as unexpected (or it already has our name)
    return out


def is_chatglm2(hf: dict) -> bool:
    return "padded_vocab_size" in hf or "multi_query_attention" in hf or "kv_channels" in hf


# --- tokenizer: tokenizer.model plus the specials SPTokenizer appends, and the chat prompts ---------------

# SPTokenizer appends these after the SentencePiece pieces; its tokenizer never finds them in text.
_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def chatglm2_prompt(tokenizer, messages, add_generation_prompt) -> str:
    """ChatGLM2 `build_prompt`: "[Round i]\\n\\n问：…\\n\\n答：…" with rounds from 1, also on the first turn."""
    _, turns = split_system(messages, "ChatGLM2", ("user", "assistant"), takes_system=False)
    return glm_rounds(*rounds(turns, "ChatGLM2"), first_round=1, sep="\n\n")


def chatglm3_prompt(tokenizer, messages, add_generation_prompt) -> list[int]:
    """ChatGLM3 `build_chat_input`: per message <|role|> + encode(metadata + "\\n") + encode(content) (a system
    message's `tools` appended as JSON), <|assistant|> to open the reply, all after [gMASK] sop."""
    ids = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant", "observation"):
            raise MlxfamError(f"chat message {i}: role {role!r} is not supported by the ChatGLM3 format")
        if role == "system" and "tools" in message:
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids.append(tokenizer.token_to_id(f"<|{role}|>"))
        ids += tokenizer.encode_ordinary(f"{message.get('metadata', '')}\n") + tokenizer.encode_ordinary(content)
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id("<|assistant|>"))
    return tokenizer.build_inputs_with_special_tokens(ids)


_CHAT_FORMATS = {2: ChatFormat("chatglm2", chatglm2_prompt), 3: ChatFormat("chatglm3", chatglm3_prompt)}


def read_tokenizer(source: TokenizerSource) -> tuple[Vocabulary, FileDefaults] | None:
    """tokenizer.model (None without it) plus the specials SPTokenizer appends (ChatGLM3: also its role tokens),
    [gMASK] sop before a text, and the chat prompt of the version the configs name."""
    file = source.path / "tokenizer.model"
    if not file.is_file():
        return None
    names = {
        f"{source.config_file} name_or_path": source.config.get("name_or_path"),
        f"{source.path / 'config.json'} _name_or_path": source.model_config.get("_name_or_path"),
    }
    version = chatglm_version(names, str(source.path), "same tokenizer.model, different chat formats")
    processor = sentencepiece_processor(file.read_bytes(), str(file))
    vocabulary = with_appended_tokens(
        sentencepiece_vocabulary(processor), _SPECIALS + (_CHATGLM3_ROLES if version == 3 else ())
    )
    vocabulary = with_added_tokens(vocabulary, added_tokens(source.config, source.config_file))
    ids = vocabulary.vocab
    return vocabulary, FileDefaults(
        bos_id=None,  # the [gMASK] sop prefix takes BOS's place
        eos_id=processor.eos_id(),
        prefix_ids=[ids["[gMASK]"], ids["sop"]],
        # ChatGLM3's chat() also ends at the next user or tool turn.
        stop_ids=[ids["<|user|>"], ids["<|observation|>"]] if version == 3 else [],
        chat_format=_CHAT_FORMATS[version],
    )


# ChatGLM-6B's rules come first for ChatGLMTokenizer and read ice_text.model; without one, these read the directory.
TOKENIZER = TokenizerRules(remote_classes=("ChatGLMTokenizer",), read=read_tokenizer)


FAMILY = Family(
    name="chatglm2",
    description="ChatGLM2-6B, ChatGLM3-6B",
    model_types=("chatglm",),
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    config=chatglm2_config,
    model_class=ChatGLM2ForConditionalGeneration,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="query_key_value [q; k; v]; dense_h_to_4h [gate; up]",
        biases="q/k/v",
        positions="RoPE on half of each head, interleaved",
        attention="MQA groups (GQA)",
        scalings="rope_ratio (v2: positions, v3: base)",
    ),
    matches=is_chatglm2,
    tokenizer=TOKENIZER,
)
