"""Llama 1/2/3/3.1, Code Llama, Yi (also the legacy `YiForCausalLM`), Mistral, SmolLM2: the baseline.

Every other family is written as this one plus its differences.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MlxfamError
from ..gguf import ArchitectureMetadata
from ..tokenizer.split_patterns import DIGIT_TRIPLE_SPLIT
from ..tokenizer.tiktoken_vocab import TiktokenDefinition
from .base import CausalLM, DecoderModel, ModelConfig, require
from .family import Family, GgufNames, MlxLmLayout, TokenizerRules, Traits
from .rope import RopeConfig


def llama_config(hf: dict, **overrides) -> ModelConfig:
    """A Llama-layout HF config (the keys transformers' LlamaConfig reads)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise MlxfamError(f"config.json: hidden_act {act!r} is not supported for a Llama-family model (only 'silu')")
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // heads
    layers = require(hf, "num_hidden_layers")
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    fields = dict(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(hf, "intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=RopeConfig.from_hf(hf, head_dim, hf.get("rope_theta", 10000.0)),
        max_position_embeddings=hf.get("max_position_embeddings"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        sliding_windows=(window,) * layers,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, DecoderModel(cfg))


# The Nov-2023 YiForCausalLM release named the two layer norms ln1 / ln2.
_YI_LEGACY_NAMES = {".ln1.": ".input_layernorm.", ".ln2.": ".post_attention_layernorm."}


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer the originals save; the rotary tables are recomputed
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        for old, new in _YI_LEGACY_NAMES.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


# Meta's original Llama 3/3.1 tokenizer.model is a tiktoken file (their tokenizer.py).
_TIKTOKEN_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip
TIKTOKEN = TiktokenDefinition(
    name="Llama 3",
    file_name="tokenizer.model",
    n_ranks=128000,
    pattern=DIGIT_TRIPLE_SPLIT,  # tokenizer.py pat_str
    # Llama 3.1's tokenizer.py: the named tokens, then reserved ones up to 256 in all.
    specials=_TIKTOKEN_NAMED_SPECIALS + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)),
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    stops=("<|eom_id|>", "<|eot_id|>"),
    nfc=False,
)
# YiTokenizer is LlamaTokenizer under another name: the generic reading is exact.
TOKENIZER = TokenizerRules(remote_classes=("YiTokenizer",), tiktoken=(TIKTOKEN,))


# --- GGUF (llama.cpp's `llama` architecture) --------------------------------------------------------------


def gguf_config(field: ArchitectureMetadata, tensors: dict, path: Path) -> dict:
    """The HF config.json of a llama-architecture GGUF, from its `llama.*` metadata."""
    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rotary_dims = int(field("rope.dimension_count", config["head_dim"]))
    if rotary_dims != config["head_dim"]:
        raise MlxfamError(
            f"{path}: partial rotary ({rotary_dims} of {config['head_dim']} dims) is not supported for llama"
        )
    scaling = field.get("rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(field("rope.scaling.factor"))}
        original = field.get("rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif scaling != "none":
        raise MlxfamError(f"{path}: GGUF rope scaling {scaling!r} is not supported (supported: linear, yarn)")
    experts = field.get("expert_count", 0)
    if experts:  # Mixtral: llama.cpp's llama architecture with a softmax top-k router over SwiGLU experts
        config.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=int(experts),
            num_experts_per_tok=int(field("expert_used_count")),
        )
    return config


GGUF = GgufNames(
    architecture="llama",
    layer_names={
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        # Mixtral's router and its experts, stacked [expert, out, in] as mixtral.py's SwitchGLU holds them.
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
        "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
        "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj",
    },
    global_names={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    # llama.cpp's converter permutes q and k rows for its interleaved rotary.
    permuted_heads={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
    config=gguf_config,
)


FAMILY = Family(
    name="llama",
    description="Llama 1/2/3/3.1, Code Llama, Yi, Mistral, SmolLM2",
    model_types=("llama", "mistral", "Yi", "yi"),
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "YiForCausalLM"),
    config=llama_config,
    model_class=LlamaForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        attention="MHA/GQA; Mistral: sliding window",
        head="untied (tied: Llama 3.2, SmolLM2)",
        scalings="rope linear/dynamic/llama3/yarn",
        tokenizer="SentencePiece; BPE (Llama 3, SmolLM2)",
    ),
    tokenizer=TOKENIZER,
    # mlx-lm's parameter names are ours; it knows Yi's model_type as llama.
    mlx_lm=MlxLmLayout(model_type_renames={"Yi": "llama", "yi": "llama"}),
    gguf=GGUF,
)
