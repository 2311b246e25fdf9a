"""Baichuan 1 and 2 (7B and 13B): Llama plus a fused W_pack, ALiBi on the 13B models, NormHead on Baichuan 2.

One architecture name and model_type cover four variants; the config tells them apart:
- RoPE (7B) vs ALiBi (13B): the 7B configs carry `max_position_embeddings`, the 13B configs only
  `model_max_length` (hidden size 4096 would also work for the real checkpoints, not for small ones).
- Baichuan 2 vs 1: vocab 125696, or the `z_loss_weight` field only Baichuan 2 configs carry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from ..chat_formats import ChatFormat, split_system
from ..errors import MlxfamError
from ..tokenizer.core import FileDefaults, TokenizerSource, Vocabulary, vocabulary_id
from .base import CausalLM, DecoderModel, ModelConfig, require
from .family import Family, TokenizerRules, Traits
from .llama import llama_config
from .rope import RopeConfig

BAICHUAN2_VOCAB_SIZE = 125696


@dataclass(frozen=True)
class BaichuanConfig(ModelConfig):
    norm_head: bool = False  # Baichuan 2: logits use L2-normalised lm_head rows


def baichuan_config(hf: dict) -> BaichuanConfig:
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    if hf.get("max_position_embeddings") is not None:  # 7B: RoPE with the hard-coded theta 10000
        rope, context = RopeConfig(dims=hidden // heads, base=10000.0), hf["max_position_embeddings"]
    else:  # 13B: ALiBi
        rope, context = None, require(hf, "max_position_embeddings", "model_max_length")
    llama = llama_config(hf, rope=rope, max_position_embeddings=context)
    norm_head = hf["vocab_size"] == BAICHUAN2_VOCAB_SIZE or "z_loss_weight" in hf
    return BaichuanConfig(**vars(llama), norm_head=norm_head)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Baichuan's `_get_interleave`: 2^(-8k/m) for k = 1..m (m the largest power of two <= heads),
    then every other slope of the 2m-head series for the remaining heads."""
    m = 1 << (num_heads.bit_length() - 1)
    extra = num_heads - m
    return np.concatenate([2.0 ** (-8.0 * np.arange(1, m + 1) / m), 2.0 ** (-4.0 * np.arange(1, 2 * extra, 2) / m)])


class AlibiDecoderModel(DecoderModel):
    """The 13B models: no rotary embedding; every head adds slope * (key pos - query pos) to its scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self._slopes = mx.array(alibi_slopes(cfg.num_heads), dtype=mx.float32)[:, None, None]

    def make_mask(self, inputs: mx.array, cache, window: int | None) -> mx.array:
        length = inputs.shape[1]
        visible = super().make_mask(inputs, cache, window)
        offset = cache.offset if cache is not None else 0
        keys = cache.key_positions(length) if cache is not None else np.arange(length)
        distance = keys[None, :] - np.arange(offset, offset + length)[:, None]
        if not isinstance(visible, mx.array):  # "causal" or None: the keys at or before each query
            visible = mx.array(distance <= 0)
        # Built in fp32 (bf16 would round large distances), then cast to what the scores are in.
        bias = self._slopes * mx.array(distance, dtype=mx.float32)
        return mx.where(visible, bias, -mx.inf).astype(self.norm.weight.dtype)


class BaichuanForCausalLM(CausalLM):
    def __init__(self, cfg: BaichuanConfig):
        super().__init__(cfg, (DecoderModel if cfg.rope is not None else AlibiDecoderModel)(cfg))


def sanitize(weights: dict, cfg: BaichuanConfig) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # Baichuan-7B saves its rotary buffer; the tables are recomputed
        if name.endswith(".self_attn.W_pack.weight"):
            if tensor.shape[0] != 3 * cfg.num_heads * cfg.head_dim:
                raise MlxfamError(
                    f"tensor {name}: shape {tuple(tensor.shape)}, expected {3 * cfg.num_heads * cfg.head_dim} "
                    "rows (q; k; v)"
                )
            prefix = name.removesuffix("W_pack.weight")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), mx.split(tensor, 3, axis=0)):
                out[f"{prefix}{proj}.weight"] = part
            continue
        out[name] = tensor
    # NormHead divides each row by its L2 norm at the first forward; doing it once here is the same.
    # A quantized head (`lm_head.scales`) was written from an already-loaded, hence normalised, model.
    if cfg.norm_head and "lm_head.weight" in out and "lm_head.scales" not in out:
        head = out["lm_head.weight"]
        rows = head.astype(mx.float32)
        norms = mx.sqrt((rows * rows).sum(axis=-1, keepdims=True))
        out["lm_head.weight"] = (rows / mx.maximum(norms, 1e-12)).astype(head.dtype)
    return out


def chat_prompt(tokenizer, messages, add_generation_prompt, *, user_token_id: int, assistant_token_id: int):
    """`build_chat_input`: the system text, then each turn's role id and text, every text encoded as
    `tokenizer.encode` does (with BOS where the tokenizer adds one); a final assistant id opens the reply."""
    system, turns = split_system(messages, "Baichuan", ("user", "assistant"))
    ids = tokenizer.encode(system or "")
    for message in turns:
        ids += [
            user_token_id if message["role"] == "user" else assistant_token_id,
            *tokenizer.encode(message["content"]),
        ]
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        ids.append(assistant_token_id)
    return ids


def chat_settings(vocabulary: Vocabulary, defaults: FileDefaults, source: TokenizerSource) -> FileDefaults:
    """The role ids, from generation_config.json where it sets them."""
    generation_file = source.path / "generation_config.json"
    generation = source.json("generation_config.json")
    role_ids = {
        key: vocabulary_id(vocabulary, generation.get(key, default), f"{generation_file}: {key}")
        for key, default in defaults.chat_format.options.items()
    }
    return replace(defaults, chat_format=defaults.chat_format.with_options(**role_ids))


TOKENIZER = TokenizerRules(
    remote_classes=("BaichuanTokenizer", "BaiChuanTokenizer"),  # the second: Baichuan-7B
    chat_format=ChatFormat("baichuan", chat_prompt, {"user_token_id": 195, "assistant_token_id": 196}),
    chat_settings=chat_settings,
)


FAMILY = Family(
    name="baichuan",
    description="Baichuan-7B/13B, Baichuan2-7B/13B",
    model_types=("baichuan",),
    architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"),
    config=baichuan_config,
    model_class=BaichuanForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        fused_qkv="W_pack [q;k;v]",
        positions="RoPE (7B); ALiBi (13B)",
        head="untied; Baichuan 2: NormHead",
    ),
    tokenizer=TOKENIZER,
)
