"""InternLM2 (`InternLM2ForCausalLM`, remote code): Llama with a fused `wqkv` interleaved per kv
group, its own tensor names (w1/w3/w2, attention_norm/ffn_norm, tok_embeddings, output) and the
legacy dynamic NTK: past max_position_embeddings the rotary base follows the current total length
while cached keys keep the base they were rotated with (rope.py's "dynamic" type).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..chat_formats import ChatFormat, split_system
from ..errors import MlxfamError
from ..gguf import ArchitectureMetadata
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary, token_text
from .base import CausalLM, DecoderModel, ModelConfig
from .family import Family, TokenizerRules, Traits
from .llama import GGUF as LLAMA_GGUF
from .llama import gguf_config as llama_gguf_config
from .llama import llama_config

_ROPE_SCALINGS = ("dynamic", "linear")  # what the original code accepts


def internlm2_config(hf: dict) -> ModelConfig:
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("type") not in _ROPE_SCALINGS:
        raise MlxfamError(
            f"config.json: rope_scaling type {scaling.get('type')!r} is not supported for InternLM2 "
            f"(supported: {', '.join(_ROPE_SCALINGS)})"
        )
    return llama_config(hf, attention_bias=hf.get("bias", True))  # InternLM2Config defaults bias to true


class InternLM2ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, DecoderModel(cfg))
        # Past max_position_embeddings the rotary base depends on the length the first forward
        # sees; the original's generate gives it the whole prompt.
        self.whole_prompt_prefill = cfg.rope.rope_type == "dynamic"


_TOP_LEVEL = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def split_wqkv(name: str, tensor: mx.array, cfg: ModelConfig) -> tuple[mx.array, mx.array, mx.array]:
    """wqkv rows are, per kv group, its `groups` query heads, then its key head, then its value head."""
    groups, head_dim = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    rows = cfg.num_kv_heads * (groups + 2) * head_dim
    if tensor.shape[0] != rows:
        raise MlxfamError(f"checkpoint: tensor {name} has {tensor.shape[0]} rows, expected {rows}")
    rest = tensor.shape[1:]
    grouped = tensor.reshape(cfg.num_kv_heads, groups + 2, head_dim, *rest)
    return (
        grouped[:, :groups].reshape(-1, *rest),
        grouped[:, groups].reshape(-1, *rest),
        grouped[:, groups + 1].reshape(-1, *rest),
    )


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "output.weight" and cfg.tie_word_embeddings):
            continue
        layer = _LAYER.fullmatch(name)
        if layer is None:  # top-level tensors, or an unknown name the loader reports
            out[_TOP_LEVEL.get(name, name)] = tensor
            continue
        index, module, kind = layer.groups()
        prefix = f"model.layers.{index}."
        if module == "attention.wqkv":
            parts = split_wqkv(name, tensor, cfg)
            out.update({f"{prefix}self_attn.{proj}_proj.{kind}": part for proj, part in zip("qkv", parts)})
        else:
            out[f"{prefix}{_RENAMES.get(module, module)}.{kind}"] = tensor
    return out


# `chat(meta_instruction=...)`'s default (modeling_internlm2.py).
DEFAULT_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)
_IM_START_ID, _IM_END_ID = 92543, 92542


def chat_prompt(tokenizer, messages, add_generation_prompt, *, im_start: str, im_end: str) -> str:
    """`build_inputs`: ChatML with its meta instruction as system prompt (an empty one drops the block), and
    exactly one BOS: written here only when the tokenizer does not add it."""
    system, turns = split_system(messages, "InternLM2", ("user", "assistant"))
    system = DEFAULT_SYSTEM if system is None else system
    text = "" if tokenizer.add_bos_token else tokenizer.bos_token or ""
    blocks = ([("system", system)] if system else []) + [(m["role"], m["content"]) for m in turns]
    text += "".join(f"{im_start}{role}\n{content}{im_end}\n" for role, content in blocks)
    return text + f"{im_start}assistant\n" if add_generation_prompt else text


def chat_settings(vocabulary: Vocabulary, defaults: FileDefaults, source: TokenizerSource) -> FileDefaults:
    """<|im_start|> 92543 and <|im_end|> 92542 are spelled [UNUSED_TOKEN_146] / [UNUSED_TOKEN_145] in the first
    files: the prompt uses the vocabulary's spelling; the chat ends on <|im_end|>."""
    im_start, im_end = (token_text(vocabulary, i, source.path, "InternLM2") for i in (_IM_START_ID, _IM_END_ID))
    chat_format = defaults.chat_format.with_options(im_start=im_start, im_end=im_end)
    return replace(defaults, chat_format=chat_format, stop_ids=[*defaults.stop_ids, _IM_END_ID])


TOKENIZER = TokenizerRules(
    # InternLMTokenizer: InternLM2's first releases (config.json model_type internlm2).
    remote_classes=("InternLM2Tokenizer", "InternLM2TokenizerFast", "InternLMTokenizer"),
    chat_format=ChatFormat("internlm2", chat_prompt, {"im_start": "<|im_start|>", "im_end": "<|im_end|>"}),
    chat_settings=chat_settings,
)


def gguf_config(field: ArchitectureMetadata, tensors: dict, path: Path) -> dict:
    """An internlm2-architecture GGUF: Llama's fields. The format has no dynamic NTK: llama.cpp rotates with the
    plain base at every length, and so does this config."""
    config = llama_gguf_config(field, tensors, path)
    if "num_local_experts" in config:
        raise MlxfamError(f"{path}: InternLM2 with experts (internlm2.expert_count) is not supported")
    return {
        **config,
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "bias": "blk.0.attn_q.bias" in tensors,
    }


# Llama's tensor names: the converter splits wqkv per kv group into attn_q / attn_k / attn_v and permutes q and k
# rows as it does for Llama.
GGUF = replace(LLAMA_GGUF, architecture="internlm2", config=gguf_config)


FAMILY = Family(
    name="internlm2",
    description="InternLM2 (1.8B, 7B, 20B)",
    model_types=("internlm2",),
    architectures=("InternLM2ForCausalLM",),
    config=internlm2_config,
    model_class=InternLM2ForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="wqkv, interleaved per kv group",
        attention="GQA",
        scalings="legacy dynamic NTK (keys keep their base)",
    ),
    tokenizer=TOKENIZER,
    gguf=GGUF,
)
