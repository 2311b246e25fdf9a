"""The packed layout of a quantizing KV cache: what `mlxfam.cache` stores, what the attention in
`mlxfam.kernels.attention` reads (by `mx.quantized_matmul`, or its Metal/CUDA kernel, in place) and
what the cache-write kernel of `mlxfam.kernels.kv_write` writes. It imports neither of them.

Tokens are quantized a block of `group_size` (G) at a time, with MLX's affine quantization (`bits`
4 or 8; element = scale * u + bias, u the unsigned `bits`-bit integer; a scale may be negative: MLX
anchors the bias at the group's edge of larger magnitude). Until a block is full its tokens wait in
a float tail. Per layer, a `QuantizedKV` for the keys and one for the values:

    keys, per channel over each block's G slots (outlier channels get their own scale):
        data    uint32       (B, kv_heads, head_dim, S * bits // 32)
        scales  keys' dtype  (B, kv_heads, head_dim, S // G)
        biases  keys' dtype  (B, kv_heads, head_dim, S // G)
    values, per slot over groups of G consecutive head_dim elements:
        data    uint32       (B, kv_heads, S, head_dim * bits // 32)
        scales  dtype        (B, kv_heads, S, head_dim // G)
        biases  dtype        (B, kv_heads, S, head_dim // G)
    tail        dtype        (B, kv_heads, T, head_dim), T < G: the newest tokens, not yet quantized

Key (slot s, channel d) = scales[b, h, d, s // G] * u + biases[b, h, d, s // G], u at bit offset
(s * bits) % 32 of word data[b, h, d, s * bits // 32]; value (s, d) = scales[b, h, s, d // G] * u +
biases[b, h, s, d // G], u at bit (d * bits) % 32 of word data[b, h, s, d * bits // 32]. A word holds
32 // bits elements, the lowest-numbered in its lowest bits. The keys are thus `mx.quantize(K^T)`:
q @ K^T is `mx.quantized_matmul(q, data, scales, biases, transpose=False)`, as p @ V is for the values.
Per-channel keys matter: SmolLM2's keys carry channels of |k| ~15 among values of ~1.4, and groups
along head_dim spend their range on them (4-bit KV perplexity +13.0% per token, +0.03% per channel
with group 64; README).

Slots: the S packed slots come first, then the T tail slots (how a cache orders its blocks:
`mlxfam.cache`).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from .errors import MlxfamError

# The packings of the layout, each of which the kernels are built for.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64)
PACKED_PARTS = ("data", "scales", "biases")  # what `mx.quantize` returns, in its order
QUANTIZED_ARRAYS = (*PACKED_PARTS, "tail")  # `QuantizedKV.arrays`

Packed = tuple[mx.array, mx.array, mx.array]  # (data, scales, biases)


class NotAPlainArray(MlxfamError, AttributeError):
    """Quantized keys/values reached code that reads cached keys as a plain array (an AttributeError
    too, so `hasattr` still answers)."""


class QuantizedKV(NamedTuple):
    """Keys (`per_channel`) or values of a quantizing cache, as the module docstring lays them out."""

    data: mx.array
    scales: mx.array
    biases: mx.array
    tail: mx.array
    group_size: int
    bits: int
    per_channel: bool

    @property
    def packed_slots(self) -> int:
        return self.scales.shape[-1] * self.group_size if self.per_channel else self.data.shape[2]

    @property
    def slots(self) -> int:
        return self.packed_slots + self.tail.shape[2]

    @property
    def arrays(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        return self.data, self.scales, self.biases, self.tail

    def __getattr__(self, name: str):
        # Reached only for what a QuantizedKV lacks: a family that reworks the keys a cache hands back
        # (InternLM's dynamic rotary re-rotates them every step) cannot read them packed.
        raise NotAPlainArray(
            f"this model reads its cached keys and values as plain arrays (.{name}), which a quantized "
            "KV cache does not hand back: kv_bits is not supported for it"
        )


def slot_count(x: mx.array | QuantizedKV) -> int:
    return x.slots if isinstance(x, QuantizedKV) else x.shape[2]


def pack_blocks(keys: mx.array, values: mx.array, bits: int, group_size: int) -> tuple[Packed, Packed]:
    """The layout's packed parts of whole blocks of `(B, kv_heads, L, head_dim)` keys and values, by
    `mx.quantize` (the reference the cache-write kernel is held to): the keys transposed, so that they
    are packed per channel, the values as they are."""
    return (
        tuple(mx.quantize(keys.swapaxes(-1, -2), group_size=group_size, bits=bits)),
        tuple(mx.quantize(values, group_size=group_size, bits=bits)),
    )
