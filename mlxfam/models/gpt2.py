"""GPT-2: learned absolute positions instead of RoPE, LayerNorms with bias, biased linears, a
fused Conv1D `c_attn`, the un-gated MLP c_proj(gelu_tanh(c_fc x)) and a head tied to `wte`.

The checkpoint's names (`h.N.attn.c_attn`, no `transformer.` prefix on the hub) are renamed to the
Llama layout, and its Conv1D weights, stored [in, out], are transposed.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxfamError
from ..gguf import ArchitectureMetadata
from .base import MLP, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .family import Family, GgufNames, Traits

_TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_config(hf: dict) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _TANH_GELU_NAMES:
        raise MlxfamError(
            f"config.json: activation_function {activation!r} is not supported for GPT-2 "
            f"(supported: {', '.join(_TANH_GELU_NAMES)})"
        )
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise MlxfamError("config.json: scale_attn_by_inverse_layer_idx true is not supported")
    hidden = require(hf, "n_embd", "hidden_size")
    heads = require(hf, "n_head", "num_attention_heads")
    if hidden % heads:
        raise MlxfamError(f"config.json: n_embd ({hidden}) is not a multiple of n_head ({heads})")
    return ModelConfig(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(hf, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        rope=None,
        max_position_embeddings=require(hf, "n_positions", "max_position_embeddings"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=True,
        mlp_bias=True,
        norm="layer",
        activation="gelu_tanh",
        attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )


class GPT2DecoderLayer(DecoderLayer):
    mlp_class = MLP


class GPT2Model(DecoderModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, GPT2DecoderLayer)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def embed(self, inputs: mx.array, cache: list | None) -> mx.array:
        start = cache[0].offset if cache else 0
        end = start + inputs.shape[1]
        positions = self.embed_positions.weight.shape[0]
        if end > positions:
            # Learned positions stop at n_positions; an index past the table would read garbage.
            raise MlxfamError(f"GPT-2 has learned positions for {positions} tokens (n_positions); got up to {end}")
        return self.embed_tokens(inputs) + self.embed_positions(mx.arange(start, end))


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, GPT2Model(cfg))


_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers the original files carry
_TOP_LEVEL = re.compile(r"(wte|wpe|ln_f)\.(weight|bias)")
_TOP_LEVEL_NAMES = {"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "norm"}
_LAYER = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_NAMES = {
    "ln_1": "input_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored [in, out]


def _renamed(name: str, tensor: mx.array, hidden: int) -> dict:
    """One checkpoint tensor under our names (c_attn becomes q/k/v); an unknown name is kept for
    the loader to report as unexpected."""
    if top := _TOP_LEVEL.fullmatch(name):
        return {f"model.{_TOP_LEVEL_NAMES[top[1]]}.{top[2]}": tensor}
    layer = _LAYER.fullmatch(name)
    if layer is None or (layer[2] not in _LAYER_NAMES and layer[2] != "attn.c_attn"):
        return {name: tensor}
    index, module, kind = layer.groups()
    if module in _CONV1D and kind == "weight":
        tensor = tensor.T
    prefix = f"model.layers.{index}."
    if module == "attn.c_attn":
        # Rows [q; k; v] once transposed; wrong sizes surface in the loader's shape check.
        parts = mx.split(tensor, [hidden, 2 * hidden], axis=0)
        return {f"{prefix}self_attn.{proj}_proj.{kind}": part for proj, part in zip("qkv", parts)}
    return {f"{prefix}{_LAYER_NAMES[module]}.{kind}": tensor}


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        name = name.removeprefix("transformer.")
        if _BUFFERS.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # a saved copy of the tied head is dropped too
        out.update(_renamed(name, tensor, cfg.hidden_size))
    return out


# --- GGUF (llama.cpp's `gpt2` architecture) ---------------------------------------------------------------


def gguf_config(field: ArchitectureMetadata, tensors: dict, path: Path) -> dict:
    """The HF config.json of a gpt2-architecture GGUF: llama.cpp's graph is GPT-2's (tanh GELU, 1/sqrt(head_dim))."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": int(field("embedding_length")),
        "n_inner": int(field("feed_forward_length")),
        "n_layer": int(field("block_count")),
        "n_head": int(field("attention.head_count")),
        "layer_norm_epsilon": float(field("attention.layer_norm_epsilon")),
        "n_positions": int(tensors["position_embd.weight"].shape[0]),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }


GGUF = GgufNames(
    architecture="gpt2",
    layer_names={
        "attn_norm": "input_layernorm",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    global_names={
        "token_embd": "model.embed_tokens",
        "position_embd": "model.embed_positions",
        "output_norm": "model.norm",
        "output": "lm_head",
    },
    permuted_heads={},
    config=gguf_config,
    # c_attn, transposed to [out, in] by the converter: rows [q; k; v].
    fused={"attn_qkv": lambda hf: {f"self_attn.{p}_proj": hf["n_embd"] for p in "qkv"}},
)


FAMILY = Family(
    name="gpt2",
    description="GPT-2",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel",),
    config=gpt2_config,
    model_class=GPT2LMHeadModel,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="c_attn (Conv1D [in, out])",
        biases="all linears and norms",
        norm="LayerNorm",
        activation="GELU (tanh), un-gated",
        positions="learned absolute",
        attention="MHA",
        head="tied",
        tokenizer="byte-level BPE",
    ),
    gguf=GGUF,
)
