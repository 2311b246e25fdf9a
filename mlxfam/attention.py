"""Scaled dot-product attention: the one function every model's attention goes through.

`attend` is the dispatch seam: it takes queries `(B, heads, L, d)` and the keys/values a cache
returned `(B, kv_heads, S, d)` (GQA: query head h reads kv head h // (heads / kv_heads)) and picks
the implementation. The mask is "causal", None (all visible), a boolean array (True = visible)
or an additive float array (ALiBi biases, with -inf where hidden), broadcastable to
`(B, heads, L, S)`.
"""

from __future__ import annotations

import mlx.core as mx


def attend(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask=None,
    softcap: float | None = None,
) -> mx.array:
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return softcapped_attention(q, k, v, scale=scale, mask=mask, softcap=softcap)


def softcapped_attention(q, k, v, *, scale: float, mask, softcap: float) -> mx.array:
    """Gemma 2: scores -> softcap * tanh(scores / softcap) before the mask, softmax in fp32."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    q = (q * scale).reshape(batch, kv_heads, groups, length, dim)
    scores = (q @ k[:, :, None].swapaxes(-1, -2)).astype(mx.float32)
    scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        mask = causal_mask(length, k.shape[2])
    if mask is not None:
        mask = _grouped(mask, kv_heads, groups)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1).astype(v.dtype)
    return (weights @ v[:, :, None]).reshape(batch, heads, length, -1)


def causal_mask(query_len: int, key_len: int) -> mx.array:
    """Queries are the last `query_len` of `key_len` positions."""
    offset = key_len - query_len
    return mx.arange(key_len)[None] <= mx.arange(offset, key_len)[:, None]


def _grouped(mask: mx.array, kv_heads: int, groups: int) -> mx.array:
    """A mask broadcastable to (B, heads, L, S), reshaped to broadcast to (B, kv_heads, groups, L, S)."""
    if mask.ndim <= 2:
        return mask
    if mask.shape[-3] == 1:
        return mx.expand_dims(mask, -3)
    return mask.reshape(*mask.shape[:-3], kv_heads, groups, *mask.shape[-2:])
