"""InternLM2 (`InternLM2ForCausalLM`, remote code): Llama with a fused `wqkv` interleaved per kv
group, its own tensor names (w1/w3/w2, attention_norm/ffn_norm, tok_embeddings, output) and the
legacy dynamic NTK: past max_position_embeddings the rotary base follows the current total length
while cached keys keep the base they were rotated with (rope.py's "dynamic" type).
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..errors import MlxfamError
from .base import CausalLM, DecoderModel, ModelConfig
from .family import Family, Traits
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
)
