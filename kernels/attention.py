"""GQA attention over plain or packed (quantized) keys and values: the pure-MLX reference, the
Metal/CUDA kernels, and `attention`, which picks one per call.

Queries are `(B, Hq, L, D)`; keys and values are `(B, Hkv, S, D)` arrays or `QuantizedKV`s (the
cache layout of `mlxfam.kv_layout`: keys packed per channel, values per token, then a float tail of the
newest tokens; the keys are the packed slots then the tail). Query head h reads kv head
h // (Hq / Hkv). What hides a key from a query is `mask`: "causal" (the L queries are the last L
of the keys), a bool array (True = visible) or an additive float array (ALiBi biases, -inf where
hidden), broadcastable to `(B, Hq, L, n_keys)`. The models build every mask they need (sliding
windows, a rotating cache's slots in any order, ALiBi, bidirectional prefixes) as such an array.

Scores are q.k * scale, then softcap * tanh(scores / softcap) when a softcap is given (Gemma 2),
then the mask; the softmax is in float32 always.

The kernels (attention.inc, one text for Metal and CUDA after each platform's prelude) serve decode and short
query chunks: one block per (batch row, kv head, split of the keys) serves all the query heads of
the kv head's group and all L queries, so each key and value is read once per group; the keys are
read packed as stored (lanes over key slots for q.k, lanes over head_dim for p.v), through the
arrays' strides, so a cache's preallocated buffers are never copied. Long contexts are split over
the keys (about one split per `SPLIT_KEYS` keys, at most `MAX_SPLITS`) and a second kernel merges
the splits' partial softmax statistics. A block holds its query rows' state in registers, so it
serves at most `max_rows(head_dim)` rows (query heads per kv head x queries): 16 for head_dim 64,
8 for the others. More rows go to up to `MAX_ROW_BLOCKS` blocks of rows, each reading the keys and
values again (decode of a model with up to 32 query heads per kv head, or a few queries at once);
`kernel_unsupported` sends larger calls, and other head dims, to the reference.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import mlx.core as mx

from ..errors import MlxfamError
from ..kv_layout import KV_BITS, KV_GROUP_SIZES, QuantizedKV
from . import FLOAT_DTYPES, backend, placeholder, sections

HEAD_DIMS = (64, 80, 96, 128, 256)

# Kernel constants, the same as the sources' WARPS, STEP and SPW: 4 warps (simdgroups) of 32 lanes
# per block, each scoring STEP keys at a time, SPW per lane (a quarter of a 4-bit word, a whole
# 8-bit one). Split lengths are multiples of STEP, so packed steps start on a word.
WARPS = 4
THREADS = 32 * WARPS  # per block
STEP = 64
KEYS_PER_LANE = 4
SPLIT_KEYS = 512
MAX_SPLITS = 128
# Blocks of rows per (batch row, kv head, split): each reads the keys and values again, so past a
# few the reference's matmuls (one read for all rows) are the better way.
MAX_ROW_BLOCKS = 4
# fp32 accumulators a lane may hold per block: per query row, the scores of its KEYS_PER_LANE keys
# plus its head_dim elements of the output (2 for D=64, 4 up to 128, 8 for 256). Within this the
# lane's state stays in registers (on CUDA: under 255 per thread, no spills).
ACCUMULATORS = 96

_CAUSAL, _MASK, _SOFTCAP = 1, 2, 4
_PARTIAL_INPUTS = (
    "q", "k_data", "k_scales", "k_biases", "k_tail", "v_data", "v_scales", "v_biases", "v_tail",
    "mask", "counts", "factors",
)  # fmt: skip


def attention(q, k, v, *, scale: float, mask=None, softcap: float | None = None, choice: str | None = None) -> mx.array:
    """softmax(mask(softcap(q k^T * scale))) v (module docstring).

    `choice` (`mlxfam.kernels.backend`'s): "auto" (default) runs the kernel where one runs and takes
    the call (`kernel_unsupported`), else the reference; "reference" the reference, in MLX ops, all L
    queries at once (callers chunk long prefills), reading packed keys and values by
    `mx.quantized_matmul`, never dequantized into a copy, with kv heads broadcast over their query
    heads rather than repeated; "kernel" the kernel, or an MlxfamError saying why it cannot run."""
    kind = backend(choice)
    shape = _check(q, k, v, mask)
    reason = None if kind is None else _unsupported(shape, q, k, v)
    if kind is not None and reason is None:
        return _launch(kind, _partial_call(shape, q, k, v, scale, softcap, mask))
    if choice == "kernel":
        raise MlxfamError(f"the attention kernel cannot take this call: {reason}")
    return _reference(shape, q, k, v, scale, softcap, mask)


def kernel_attention(q, k, v, *, scale: float, mask=None, softcap: float | None = None) -> mx.array | None:
    """The attention by the kernel where one runs (`backend()`) and takes the call, else None: for
    callers with their own fallback (`mlxfam.attention.attend`), checking the call once."""
    kind = backend()
    if kind is None:
        return None
    shape = _check(q, k, v, mask)
    if _unsupported(shape, q, k, v) is not None:
        return None
    return _launch(kind, _partial_call(shape, q, k, v, scale, softcap, mask))


def kernel_unsupported(q, k, v, *, scale: float | None = None, mask=None, softcap: float | None = None) -> str | None:
    """Why the kernel cannot take this (valid) call, or None when it can. Bad input raises."""
    return _unsupported(_check(q, k, v, mask), q, k, v)


def _unsupported(shape: _Shape, q, k, v) -> str | None:
    if shape.dim not in HEAD_DIMS:
        return f"head_dim {shape.dim} (the kernel is built for {', '.join(map(str, HEAD_DIMS))})"
    if isinstance(k, QuantizedKV) != isinstance(v, QuantizedKV):
        return "one of keys and values is quantized and the other is not"
    if isinstance(k, QuantizedKV) and (k.bits, k.group_size) != (v.bits, v.group_size):
        return f"keys are {k.bits}-bit in groups of {k.group_size} but values {v.bits}-bit in groups of {v.group_size}"
    for name, x in (("keys", k), ("values", v)):
        for array in (x.scales, x.tail) if isinstance(x, QuantizedKV) else (x,):
            if array.dtype != q.dtype:
                return f"the {name} are {array.dtype} but the queries {q.dtype}"
    limit = MAX_ROW_BLOCKS * max_rows(shape.dim)
    if shape.groups * shape.length > limit:
        return (
            f"{shape.groups} query heads per kv head x {shape.length} queries = "
            f"{shape.groups * shape.length} rows, above the kernel's {limit} for head_dim {shape.dim} "
            f"({MAX_ROW_BLOCKS} blocks of {max_rows(shape.dim)})"
        )
    return None


def max_rows(dim: int) -> int:
    """The most query rows (query heads per kv head x queries) one block serves: the largest power
    of two whose per-lane accumulators fit in `ACCUMULATORS`."""
    per_row = KEYS_PER_LANE + (2 if dim <= 64 else 4 if dim <= 128 else 8)  # + the sources' DPL
    rows = 1
    while 2 * rows * per_row <= ACCUMULATORS:
        rows *= 2
    return rows


class _Shape(NamedTuple):
    batch: int
    kv_heads: int
    groups: int
    length: int
    dim: int
    n_keys: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.groups


def _layout(x: mx.array | QuantizedKV, name: str, per_channel: bool) -> tuple[int, int, int, int]:
    """(batch, kv_heads, n_keys, head_dim) of plain or packed keys (`per_channel`) or values."""
    if not isinstance(x, QuantizedKV):
        if x.ndim != 4:
            raise MlxfamError(f"{name}: expected (batch, kv_heads, keys, head_dim), got shape {x.shape}")
        return x.shape
    if x.per_channel != per_channel:
        expected = "per channel (keys)" if per_channel else "per token (values)"
        raise MlxfamError(f"{name}: a QuantizedKV packed {expected} was expected, per_channel={x.per_channel}")
    if x.bits not in KV_BITS or x.group_size not in KV_GROUP_SIZES:
        raise MlxfamError(
            f"{name}: {x.bits}-bit packing in groups of {x.group_size}; the cache layout has bits "
            f"{KV_BITS} and groups {KV_GROUP_SIZES}"
        )
    if x.data.dtype != mx.uint32 or any(a.ndim != 4 for a in (x.data, x.scales, x.biases, x.tail)):
        raise MlxfamError(
            f"{name}: expected 4-d uint32 data and 4-d scales, biases and tail, got data {x.data.dtype} "
            f"{x.data.shape}, scales {x.scales.shape}, biases {x.biases.shape}, tail {x.tail.shape}"
        )
    batch, kv_heads, tail, dim = x.tail.shape
    if dim % x.group_size:
        raise MlxfamError(f"{name}: group size {x.group_size} does not divide head_dim {dim}")
    if per_channel:
        packed = x.scales.shape[3] * x.group_size
        expected = {"data": (dim, packed * x.bits // 32), "scales": (dim, packed // x.group_size)}
    else:
        packed = x.data.shape[2]
        expected = {"data": (packed, dim * x.bits // 32), "scales": (packed, dim // x.group_size)}
    expected["biases"] = expected["scales"]
    for part, inner in expected.items():
        if getattr(x, part).shape != (batch, kv_heads, *inner):
            raise MlxfamError(
                f"{name}: packed {part} has shape {getattr(x, part).shape}, but the tail "
                f"{x.tail.shape} and {packed} packed slots need {(batch, kv_heads, *inner)}"
            )
    return batch, kv_heads, packed + tail, dim


def _check(q, k, v, mask) -> _Shape:
    """The call's shape; MlxfamError naming what is wrong for bad input."""
    if q.ndim != 4 or q.dtype not in FLOAT_DTYPES:
        raise MlxfamError(
            f"queries: expected (batch, heads, queries, head_dim) float16/bfloat16/float32, got {q.dtype} {q.shape}"
        )
    batch, heads, length, dim = q.shape
    k_layout = _layout(k, "keys", per_channel=True)
    v_layout = _layout(v, "values", per_channel=False)
    if k_layout != v_layout or k_layout[0] != batch or k_layout[3] != dim:
        raise MlxfamError(
            f"queries {q.shape}, keys {k_layout} and values {v_layout} (batch, kv_heads, keys, head_dim) disagree"
        )
    kv_heads, n_keys = k_layout[1], k_layout[2]
    if heads % kv_heads:
        raise MlxfamError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if n_keys == 0:
        raise MlxfamError("attention over no keys")
    shape = _Shape(batch, kv_heads, heads // kv_heads, length, dim, n_keys)
    full = (batch, heads, length, n_keys)
    if isinstance(mask, str):
        if mask != "causal":
            raise MlxfamError(f"mask {mask!r}: the only mask named by a string is 'causal'")
        if length > n_keys:
            raise MlxfamError(f"a causal mask for {length} queries over only {n_keys} keys")
    elif mask is not None and not _broadcasts(mask.shape, full):
        raise MlxfamError(f"mask of shape {mask.shape} does not broadcast to (B, Hq, L, keys) {full}")
    return shape


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return len(shape) <= len(target) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(target)))


# --- the reference -----------------------------------------------------------------------------


def _reference(shape: _Shape, q, k, v, scale: float, softcap: float | None, mask):
    grouped = (q * scale).reshape(shape.batch, shape.kv_heads, shape.groups, shape.length, shape.dim)
    scores = _key_scores(grouped, k)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    visible, bias = _mask_terms(mask, shape)
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        scores = mx.where(visible, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1)
    out = _weighted_values(weights, v)
    return out.reshape(q.shape).astype(q.dtype)


def _key_scores(q: mx.array, k: mx.array | QuantizedKV) -> mx.array:
    """float32 q @ keys^T, q `(B, Hkv, groups, L, D)`: packed slots, then the tail."""
    if not isinstance(k, QuantizedKV):
        return _float_product(q, k.swapaxes(-1, -2))
    parts = []
    if k.scales.shape[3]:
        parts.append(_packed_product(q, k))
    if k.tail.shape[2]:
        parts.append(_float_product(q, k.tail.swapaxes(-1, -2)))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _weighted_values(weights: mx.array, v: mx.array | QuantizedKV) -> mx.array:
    """weights `(B, Hkv, groups, L, keys)` @ values: packed slots' share plus the tail's."""
    if not isinstance(v, QuantizedKV):
        return _float_product(weights, v)
    n_packed = v.data.shape[2]
    parts = []
    if n_packed:
        parts.append(_packed_product(weights[..., :n_packed], v))
    if v.tail.shape[2]:
        parts.append(_float_product(weights[..., n_packed:], v.tail))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _float_product(x: mx.array, kv: mx.array) -> mx.array:
    """x @ kv in kv's dtype (so a half-precision cache is never promoted into a copy), as float32;
    kv `(B, Hkv, ...)` is broadcast over x's group axis 2."""
    return (x.astype(kv.dtype) @ mx.expand_dims(kv, 2)).astype(mx.float32)


def _packed_product(x: mx.array, kv: QuantizedKV) -> mx.array:
    """x @ the packed part of kv, read packed (transpose=False: keys are stored per channel, so
    their packed matrix is already K^T), as float32."""
    if mx.default_device() == mx.cpu:
        # The CPU's quantized_matmul has no half-precision fast path (~60x slower than float32);
        # float32 inputs promote the (small) scales and biases instead.
        x = x.astype(mx.float32)
    else:
        x = x.astype(kv.scales.dtype)
    data, scales, biases = (mx.expand_dims(a, 2) for a in (kv.data, kv.scales, kv.biases))
    product = mx.quantized_matmul(x, data, scales, biases, transpose=False, group_size=kv.group_size, bits=kv.bits)
    return product.astype(mx.float32)


def _mask_terms(mask, shape: _Shape):
    """(visible, bias): a bool and a float32 array broadcastable to `(B, Hkv, groups, L, keys)`, or
    None where nothing hides a key or adds to the scores."""
    visible = bias = None
    if isinstance(mask, str):
        first = shape.n_keys - shape.length  # "causal": the queries are the last L positions
        visible = mx.arange(shape.n_keys)[None] <= mx.arange(first, shape.n_keys)[:, None]
    elif mask is not None:
        grouped = _grouped(mask, shape)
        if mask.dtype == mx.bool_:
            visible = grouped
        else:
            bias = grouped.astype(mx.float32)
    return visible, bias


def _grouped(mask: mx.array, shape: _Shape) -> mx.array:
    """A mask broadcastable to (B, Hq, L, keys), reshaped to broadcast to (B, Hkv, groups, L, keys)."""
    if mask.ndim <= 2:
        return mask
    if mask.shape[-3] == 1:
        return mx.expand_dims(mask, -3)
    return mask.reshape(*mask.shape[:-3], shape.kv_heads, shape.groups, *mask.shape[-2:])


# --- the kernels -------------------------------------------------------------------------------


class _Call(NamedTuple):
    """One call of the partial kernel: its inputs (in `_PARTIAL_INPUTS` order), its template, the
    split of the keys and the blocks of rows."""

    shape: _Shape
    inputs: list[mx.array]
    template: list[tuple[str, object]]
    n_splits: int
    row_blocks: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """The partial kernel's grid, in threads: a block of THREADS per (batch row, kv head), by
        split, by block of rows."""
        return (THREADS * self.shape.batch * self.shape.kv_heads, self.n_splits, self.row_blocks)


def _partial_call(shape: _Shape, q, k, v, scale: float, softcap: float | None, mask) -> _Call:
    """What the partial kernel is given for this (checked) call. Plain keys and values go in as the
    tails (a cache with no packed slots), and absent or empty inputs as 1-element placeholders of
    their dtype, so one signature serves every call of a dtype."""
    if isinstance(k, QuantizedKV):
        n_packed, bits, group_size = k.packed_slots, k.bits, k.group_size
        kv = [k.data, k.scales, k.biases, k.tail, v.data, v.scales, v.biases, v.tail]
    else:
        n_packed, bits, group_size = 0, 0, 1
        packed = [placeholder(mx.uint32), placeholder(q.dtype), placeholder(q.dtype)]
        kv = [*packed, k, *packed, v]
    kv = [x if x.size else placeholder(x.dtype) for x in kv]
    flags = 0
    if isinstance(mask, str):
        flags |= _CAUSAL
        mask = None
    elif mask is not None:
        flags |= _MASK
        additive = mx.where(mask, 0.0, -mx.inf) if mask.dtype == mx.bool_ else mask.astype(mx.float32)
        mask = mx.broadcast_to(additive, (shape.batch, shape.heads, shape.length, shape.n_keys))
    if softcap is not None:
        flags |= _SOFTCAP
    # About one split per SPLIT_KEYS keys, at most MAX_SPLITS, each a multiple of STEP keys long.
    n_splits = min(MAX_SPLITS, -(-shape.n_keys // SPLIT_KEYS))
    split_len = -(-shape.n_keys // n_splits)
    split_len = -(-split_len // STEP) * STEP
    n_splits = -(-shape.n_keys // split_len)
    counts = [
        n_packed, shape.n_keys - n_packed, shape.kv_heads, shape.groups, shape.length,
        split_len, n_splits, flags, bits, group_size,
    ]  # fmt: skip
    inputs = [
        q, *kv,
        placeholder(mx.float32) if mask is None else mask,
        mx.array(counts, dtype=mx.int32),
        mx.array([scale, softcap or 0.0], dtype=mx.float32),
    ]  # fmt: skip
    rows = 1
    while rows < min(shape.groups * shape.length, max_rows(shape.dim)):
        rows *= 2
    template = [("T", q.dtype), ("D", shape.dim), ("ROWS", rows)]
    return _Call(shape, inputs, template, n_splits, -(-shape.groups * shape.length // rows))


def _reduce_template(dtype: mx.Dtype, dim: int) -> list[tuple[str, object]]:
    return [("T", dtype), ("D", dim)]


def _launch(kind: str, call: _Call) -> mx.array:
    """Runs the partial kernel, and the reduce kernel where the keys were split."""
    partial, reduce = _kernels(kind)
    shape, dtype = call.shape, call.inputs[0].dtype
    out_shape = (shape.batch, shape.heads, shape.length, shape.dim)
    blocks, rows = shape.batch * shape.kv_heads, shape.groups * shape.length
    split = call.n_splits > 1
    # Unsplit, the partial kernel writes the output itself; split, it writes the partials. The
    # outputs it does not write are given a 1-element shape.
    partial_shapes = (
        [(blocks, call.n_splits, rows, shape.dim), (blocks, call.n_splits, rows, 2)] if split else [(1,), (1,)]
    )
    out, part_out, part_stats = partial(
        inputs=call.inputs,
        template=call.template,
        grid=call.grid,
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(1,) if split else out_shape, *partial_shapes],
        output_dtypes=[dtype, mx.float32, mx.float32],
    )
    if not split:
        return out
    return reduce(
        inputs=[part_out, part_stats],
        template=_reduce_template(dtype, shape.dim),
        grid=(shape.dim * blocks * rows, 1, 1),
        threadgroup=(shape.dim, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[dtype],
    )[0]


@cache
def _kernels(kind: str):
    """(partial, reduce) kernels of backend `kind` ("metal" or "cuda")."""
    parts = sections(kind, "attention")
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    partial = make(
        name="mlxfam_attention_partial",
        input_names=list(_PARTIAL_INPUTS),
        output_names=["out", "part_out", "part_stats"],
        source=parts["attention_partial"],
        header=parts["header"],
        ensure_row_contiguous=False,
    )
    reduce = make(
        name="mlxfam_attention_reduce",
        input_names=["part_out", "part_stats"],
        output_names=["out"],
        source=parts["attention_reduce"],
        header=parts["header"],
    )
    return partial, reduce
