"""The parts every Llama-like family shares: config, attention, MLP, decoder layer, causal LM.

Module and parameter names follow the Hugging Face Llama layout (`model.layers.N.self_attn.q_proj`),
so a Llama-format checkpoint loads without renaming; a family whose checkpoint differs renames or
splits its tensors in its own `sanitize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..attention import attend
from ..cache import CacheOptions, KVCache, attention_mask
from ..errors import MlxfamError
from .rope import RopeConfig, RotaryEmbedding


@dataclass(frozen=True)
class ModelConfig:
    """What a family's HF config means, in one normalised shape the shared parts read."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope: RopeConfig | None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool | None = None  # None: as attention_bias (Qwen: biased q/k/v, un-biased o_proj)
    mlp_bias: bool = False
    # Per layer: the sliding-window width (keys q-W < k <= q) or None for full attention.
    sliding_windows: tuple[int | None, ...] = field(default=())
    norm: str = "rms"  # "rms" (Llama), "gemma" ((1+w), all fp32) or "layer" (LayerNorm with bias)
    activation: str = "silu"  # of the MLP: "silu", "gelu_tanh" or "gelu"
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attention_softcap: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # logits -> c * tanh(logits / c)
    embedding_scale: float | None = None  # embeddings x this, cast to the activation dtype first
    qk_norm: bool = False  # a `norm` over head_dim on each head's query and key, before rotary (Gemma 3, Qwen 3)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise MlxfamError(
                f"config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if self.norm not in NORMS:
            raise MlxfamError(f"config: norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.activation not in ACTIVATIONS:
            raise MlxfamError(
                f"config: activation {self.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and the whole norm runs in fp32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), 1.0 + self.weight.astype(mx.float32), self.eps).astype(x.dtype)


NORMS = {
    "rms": lambda dims, eps: nn.RMSNorm(dims, eps=eps),
    "gemma": GemmaRMSNorm,
    "layer": lambda dims, eps: nn.LayerNorm(dims, eps=eps),
}
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "gelu": nn.gelu}


def make_norm(cfg: ModelConfig, dims: int | None = None) -> nn.Module:
    return NORMS[cfg.norm](dims or cfg.hidden_size, cfg.norm_eps)


def require(hf: dict, *keys: str):
    """The first of `keys` present in an HF config dict (families rename fields), or a clear error."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise MlxfamError(f"config.json: missing field {' / '.join(repr(k) for k in keys)}")


class Attention(nn.Module):
    """Multi-head attention with GQA. A family changes one step by overriding it:
    `project_qkv` (fused or biased projections), `rotate` (its rotary variant) or `attend`.
    With `qk_norm`, `q_norm` / `k_norm` normalise each head's queries and keys before rotary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale or cfg.head_dim**-0.5
        self.softcap = cfg.attention_softcap
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        o_bias = bias if cfg.o_proj_bias is None else cfg.o_proj_bias
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        self.rope = RotaryEmbedding(cfg.rope) if cfg.rope is not None else None  # None: ALiBi or absolute
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)

    def project_qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q: mx.array, k: mx.array, cache) -> tuple[mx.array, mx.array]:
        """Rotary embedding of `(B, heads, L, head_dim)` queries and keys at the cache's offset."""
        return self.rope.rotate_qk(q, k, cache.offset if cache is not None else 0)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attend(q, k, v, scale=self.scale, mask=mask, softcap=self.softcap)

    def __call__(self, x: mx.array, mask, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rotate(q, k, cache)
        out = self.attend(q, k, v, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.activation = ACTIVATIONS[cfg.activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))): the un-gated MLP (GPT-2, ChatGLM-6B)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.activation = ACTIVATIONS[cfg.activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).

    A family swaps a part by overriding the class attribute (`attention_class`, `mlp_class`)."""

    attention_class = Attention
    mlp_class = GatedMLP

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = self.attention_class(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = self.mlp_class(cfg)
        self.sliding_window = cfg.sliding_windows[layer_idx]

    def __call__(self, x: mx.array, mask, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embedding, the layer stack and the final norm (HF's `model.` prefix).

    A family changes how inputs become hidden states by overriding `embed`, and what a query may
    see by overriding `make_mask` (ALiBi biases, bidirectional prefixes)."""

    def __init__(self, cfg: ModelConfig, layer_class=DecoderLayer):
        super().__init__()
        self.embedding_scale = cfg.embedding_scale
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [layer_class(cfg, i) for i in range(cfg.num_layers)]
        self.norm = make_norm(cfg)

    def embed(self, inputs: mx.array, cache: list | None) -> mx.array:
        h = self.embed_tokens(inputs)
        if self.embedding_scale is not None:
            h = h * mx.array(self.embedding_scale, dtype=h.dtype)
        return h

    def make_mask(self, inputs: mx.array, cache, window: int | None):
        """The mask for this step's queries over the keys `cache` will hold (None: no cache)."""
        length = inputs.shape[1]
        return cache.make_mask(length, window) if cache is not None else attention_mask(length, 0, window)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h = self.embed(inputs, cache)
        cache = cache or [None] * len(self.layers)
        masks = {}  # one mask per distinct window, shared by the layers that use it
        for layer, layer_cache in zip(self.layers, cache):
            window = layer.sliding_window
            if window not in masks:
                masks[window] = self.make_mask(inputs, layer_cache, window)
            h = layer(h, masks[window], layer_cache)
        return self.norm(h)


class CausalLM(nn.Module):
    """The mlx-lm model protocol: `model(inputs, cache=...)` -> logits `(B, L, vocab)`."""

    # True where the first forward must see the whole prompt at once (generation does not chunk it).
    whole_prompt_prefill = False
    # True where a sliding-window layer's cache holds only its window (a rotating cache) rather than
    # every token; the layer attends the same keys either way.
    window_caches = False

    def __init__(self, cfg: ModelConfig, model: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = model
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> list:
        return self.model.layers

    @property
    def context_length(self) -> int | None:
        return self.config.max_position_embeddings

    def make_cache(self, options: CacheOptions | None = None, **keywords) -> list:
        """One cache per layer, from `options` or the same options as keywords (mlx-lm's form:
        `make_cache(kv_bits=8)`; see CacheOptions). With `window_caches`, a sliding-window layer
        keeps only its window (`CacheOptions.layer_cache`)."""
        options = CacheOptions.given(options, keywords)
        options.check_head_dim(self.config.head_dim)
        windows = self.config.sliding_windows if self.window_caches else (None,) * len(self.layers)
        return [options.layer_cache(window) for window in windows]

    def logits(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.config.final_softcap
        return logits if cap is None else mx.tanh(logits / cap) * cap

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.logits(self.model(inputs, cache))
