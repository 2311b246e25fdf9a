"""Scaled dot-product attention: the one function every model's attention goes through.

`attend` is the dispatch seam: it takes queries `(B, heads, L, d)` and the keys/values a cache
returned, `(B, kv_heads, S, d)` arrays or `QuantizedKV` (packed, see `mlxfam.cache`); GQA: query
head h reads kv head h // (heads / kv_heads). The mask is "causal" (the queries are the last L of
the S keys), None (all visible), a boolean array (True = visible) or an additive float array
(ALiBi biases, with -inf where hidden), broadcastable to `(B, heads, L, S)`.

Plain keys/values without a softcap go to `mx.fast.scaled_dot_product_attention`. Everything else
is composed here: quantized keys and values are read packed by `mx.quantized_matmul` (never
dequantized into a full copy), and the queries go a chunk at a time, as many as keep a chunk's
scores `(B, heads, chunk, S)` within `CHUNK_SCORES` elements, so a long prefill's attention
memory does not grow with the prompt step or the context.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import QuantizedKV, slot_count

# 2^20 scores (4 MiB in float32) per query chunk: with the few same-sized temporaries of the
# softmax, below the float16 score matrix of a 512-token prefill step over 1k keys or more.
CHUNK_SCORES = 1 << 20


def attend(
    q: mx.array,
    k: mx.array | QuantizedKV,
    v: mx.array | QuantizedKV,
    *,
    scale: float,
    mask=None,
    softcap: float | None = None,
) -> mx.array:
    if softcap is None and not isinstance(k, QuantizedKV):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    batch, heads, length, _ = q.shape
    key_len = slot_count(k)
    chunk = max(1, CHUNK_SCORES // (batch * heads * key_len))
    outputs = []
    for start in range(0, length, chunk):
        queries = q[:, :, start : start + chunk]
        if outputs:
            # Each chunk waits for the previous one, so only one chunk's scores are alive at a time
            # (otherwise the graph may schedule every chunk's scores side by side).
            queries = mx.depends(queries, outputs[-1])
        mask_rows = _mask_rows(mask, start, start + chunk, length, key_len)
        outputs.append(_attention(queries, k, v, scale, mask_rows, softcap))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def _attention(q, k, v, scale: float, mask, softcap: float | None) -> mx.array:
    """softmax(mask(softcap(q k^T * scale))) v for one chunk of queries; kv heads are broadcast
    over their query-head group rather than repeated."""
    batch, heads, length, dim = q.shape
    kv_heads = (k.tail if isinstance(k, QuantizedKV) else k).shape[1]
    groups = heads // kv_heads
    q = (q * scale).reshape(batch, kv_heads, groups, length, dim)
    scores = _scores(q, k)
    if softcap is not None:
        # Gemma 2: scores -> softcap * tanh(scores / softcap) before the mask, softmax in fp32.
        scores = mx.tanh(scores.astype(mx.float32) / softcap) * softcap
    if mask is not None:
        mask = _grouped(mask, kv_heads, groups)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    return _weighted(weights, v).astype(q.dtype).reshape(batch, heads, length, -1)


def _scores(q: mx.array, k: mx.array | QuantizedKV) -> mx.array:
    """q @ k^T over every key slot (packed, then tail), k broadcast over q's group axis 2."""
    if not isinstance(k, QuantizedKV):
        return q.astype(k.dtype) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    tail = q.astype(k.tail.dtype) @ mx.expand_dims(k.tail, 2).swapaxes(-1, -2)
    if k.packed_slots == 0:  # (MLX's quantized_matmul cannot take an empty matrix)
        return tail
    return mx.concatenate([_quantized_matmul(q, k).astype(tail.dtype), tail], axis=-1)


def _weighted(weights: mx.array, v: mx.array | QuantizedKV) -> mx.array:
    """weights @ v over every value slot (packed, then tail)."""
    if not isinstance(v, QuantizedKV):
        return weights.astype(v.dtype) @ mx.expand_dims(v, 2)
    packed = v.packed_slots
    out = weights[..., packed:].astype(v.tail.dtype) @ mx.expand_dims(v.tail, 2)
    return out if packed == 0 else out + _quantized_matmul(weights[..., :packed], v)


def _quantized_matmul(x: mx.array, kv: QuantizedKV) -> mx.array:
    """x @ (packed part of kv, as the layout stores it: K^T per channel, V per slot)."""
    if mx.default_device() == mx.cpu:
        # The CPU's quantized_matmul has no half-precision fast path (~60x slower than float32);
        # float32 inputs promote the (small) scales and biases instead.
        x = x.astype(mx.float32)
    else:
        x = x.astype(kv.scales.dtype)
    data, scales, biases = (mx.expand_dims(a, 2) for a in (kv.data, kv.scales, kv.biases))
    return mx.quantized_matmul(x, data, scales, biases, transpose=False, group_size=kv.group_size, bits=kv.bits)


def _mask_rows(mask, start: int, stop: int, query_len: int, key_len: int):
    """The mask of queries start..stop-1 of `query_len` over `key_len` keys (None: all visible)."""
    if mask is None:
        return None
    stop = min(stop, query_len)
    if isinstance(mask, str):
        first = key_len - query_len  # "causal": the queries are the last `query_len` positions
        return mx.arange(key_len)[None] <= mx.arange(first + start, first + stop)[:, None]
    if mask.ndim < 2 or mask.shape[-2] == 1 or (start, stop) == (0, query_len):
        return mask
    return mask[..., start:stop, :]


def _grouped(mask: mx.array, kv_heads: int, groups: int) -> mx.array:
    """A mask broadcastable to (B, heads, L, S), reshaped to broadcast to (B, kv_heads, groups, L, S)."""
    if mask.ndim <= 2:
        return mask
    if mask.shape[-3] == 1:
        return mx.expand_dims(mask, -3)
    return mask.reshape(*mask.shape[:-3], kv_heads, groups, *mask.shape[-2:])
