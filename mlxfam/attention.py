"""Scaled dot-product attention: the one function every model's attention goes through.

`attend` is the dispatch seam: it takes queries `(B, heads, L, d)` and the keys/values a cache
returned, `(B, kv_heads, S, d)` arrays or `QuantizedKV` (packed, see `mlxfam.kv_layout`); GQA: query
head h reads kv head h // (heads / kv_heads). The mask is "causal" (the queries are the last L of
the S keys), None (all visible), a boolean array (True = visible) or an additive float array
(ALiBi biases, with -inf where hidden), broadcastable to `(B, heads, L, S)`.

Where a Metal or CUDA kernel runs (`mlxfam.kernels.backend`), decode and short query chunks go to
the fused GQA attention kernel, which reads plain or packed caches in one pass. Otherwise plain
keys/values without a softcap go to `mx.fast.scaled_dot_product_attention`, and the rest to the
kernel's pure-MLX reference: packed keys and values are read by `mx.quantized_matmul` (never
dequantized into a full copy), and the queries go a chunk at a time, as many as keep a chunk's
scores `(B, heads, chunk, S)` within `CHUNK_SCORES` elements, so a long prefill's attention
memory does not grow with the prompt step or the context.
"""

from __future__ import annotations

import mlx.core as mx

from .kernels.attention import attention, kernel_attention
from .kv_layout import QuantizedKV, slot_count

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
    fused = kernel_attention(q, k, v, scale=scale, mask=mask, softcap=softcap)
    if fused is not None:
        return fused
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
        outputs.append(attention(queries, k, v, scale=scale, mask=mask_rows, softcap=softcap, choice="reference"))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


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
