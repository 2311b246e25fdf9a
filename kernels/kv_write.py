"""The cache write of a quantizing cache: Metal and CUDA kernels, their pure-MLX reference, and the seam.

`rope_kv_block` turns whole blocks of `group_size` new keys (the rotation of `mlxfam.kernels.rope`,
by its tables) and quantizes them, with their values, into the packed layout of `mlxfam.kv_layout`
(keys per channel over the block's slots, values per token). MLX's custom kernels always write fresh
output arrays (an input is never updated in place), so "writing straight into the cache" means the
kernel emits exactly the cache's storage form of the new tokens (packed blocks with their scales and
biases), which the cache slice-assigns into its preallocated buffers.

`quantize_kv_blocks` is the same launch for keys already rotated, and it is the one mlxfam's caches
call: a step attends its own tokens in float (`mlxfam.cache`), so the model rotates them with
`rope_qk` anyway, and the cache packs its full blocks from those float keys. Rotating them a second
time inside the write would save nothing; packing keys per channel and values per token in one
launch saves `mx.quantize`'s transposed copy of the keys and a second launch.

The kernel (kv_write.inc, after the platform's prelude and rope.inc's rotation helpers) runs where
`mlxfam.kernels.backend(choice)` finds a GPU, launched as `mlxfam.kernels.rope` launches its own;
elsewhere `mlxfam.kv_layout.pack_blocks` (`mx.quantize`) is the reference.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import MlxfamError
from ..kv_layout import KV_BITS, KV_GROUP_SIZES, PACKED_PARTS, Packed, pack_blocks
from . import FLOAT_DTYPES, placeholder
from .rope import TABLE_INPUTS, KernelCall, Tables, check_tensor, checked_tables, chosen, launch, rotated_reference

SIMD_WIDTH = 32  # lanes per quantization group
SOURCES = ("rope", "kv_write")  # the rotation helpers, then the cache write


def _checked_blocks(k: mx.array, v: mx.array, bits: int, group_size: int) -> None:
    check_tensor("k", k)
    check_tensor("v", v)
    if bits not in KV_BITS:
        raise MlxfamError(f"bits must be one of {KV_BITS} (the quantized cache's layout), got {bits!r}")
    if group_size not in KV_GROUP_SIZES:
        raise MlxfamError(
            f"group_size must be one of {KV_GROUP_SIZES} (the quantized cache's layout), got {group_size!r}"
        )
    if k.shape != v.shape or k.dtype != v.dtype:
        raise MlxfamError(f"keys {tuple(k.shape)} {k.dtype} and values {tuple(v.shape)} {v.dtype} differ")
    length, head_dim = k.shape[2], k.shape[3]
    if length % group_size:
        raise MlxfamError(f"a cache block holds whole groups: {length} tokens is not a multiple of {group_size}")
    if head_dim % group_size:
        raise MlxfamError(f"head_dim {head_dim} is not a multiple of the group size {group_size}")


def _rope_kv_block_call(dtype: mx.Dtype, interleaved: bool, rotate: bool, bits: int, group_size: int) -> KernelCall:
    packed = tuple((f"{x}_{part}", mx.uint32 if part == "data" else dtype) for x in "kv" for part in PACKED_PARTS)
    return KernelCall(
        "rope_kv_block",
        (("k", dtype), ("v", dtype), *TABLE_INPUTS),
        packed,
        (
            ("T", dtype),
            ("INTERLEAVED", interleaved),
            ("ROTATE", rotate),
            ("BITS", bits),
            ("GROUP_SIZE", group_size),
        ),
        SOURCES,
    )


def kernel_calls() -> list[KernelCall]:
    """Every launch the launchers can request: each dtype, bits and group size, rotating (each
    pairing) or not (quantize_kv_blocks); runtime sizes come from the inputs' shapes."""
    packings = [(b, g) for b in KV_BITS for g in KV_GROUP_SIZES]
    calls = []
    for dtype in FLOAT_DTYPES:
        for interleaved in (False, True):
            calls += [_rope_kv_block_call(dtype, interleaved, True, b, g) for b, g in packings]
        calls += [_rope_kv_block_call(dtype, False, False, b, g) for b, g in packings]
    return calls


def _kv_block_threads(k: mx.array, group_size: int) -> int:
    """One simdgroup/warp per key group (b, h, channel, block), each paired with a value group."""
    return k.size // group_size * SIMD_WIDTH


def _kv_block_launch(
    kind: str, k: mx.array, v: mx.array, tables: Tables | None, interleaved: bool, bits: int, group_size: int
) -> tuple[Packed, Packed]:
    """rope_kv_block's launch; `tables` None: the keys are stored as given (ROTATE false)."""
    batch, heads, length, head_dim = k.shape
    key_words, key_groups = (
        (batch, heads, head_dim, length * bits // 32),
        (batch, heads, head_dim, length // group_size),
    )
    value_words = (batch, heads, length, head_dim * bits // 32)
    value_groups = (batch, heads, length, head_dim // group_size)
    rotate = tables is not None
    if not rotate:
        tables = (placeholder(mx.float32),) * 2  # with ROTATE false only their shape is read
    outputs = launch(
        kind,
        _rope_kv_block_call(k.dtype, interleaved and rotate, rotate, bits, group_size),
        [k, v, *tables],
        [key_words, key_groups, key_groups, value_words, value_groups, value_groups],
        _kv_block_threads(k, group_size),
    )
    return tuple(outputs[:3]), tuple(outputs[3:])


def rope_kv_block(
    k: mx.array,
    v: mx.array,
    cos: mx.array,
    sin: mx.array,
    *,
    rotary_dims: int,
    interleaved: bool,
    two_d: bool = False,
    bits: int,
    group_size: int,
    choice: str | None = None,
) -> tuple[Packed, Packed]:
    """The fused cache write of a quantizing cache: k (B, H, L, D) rotated (see `rope`) and, with
    v (B, H, L, D), quantized a block of `group_size` tokens at a time (L a multiple of it) into the
    cache's packed layout, in one launch. Returns ((k_data, k_scales, k_biases), (v_data, v_scales,
    v_biases)): the keys per channel over each block's slots, (B, H, D, L*bits/32) words and
    (B, H, D, L/group_size) scales/biases; the values per token, (B, H, L, D*bits/32) and
    (B, H, L, D/group_size). Each equals `mx.quantize` of the rotated keys transposed (of the values
    as they are) on the device that runs it: the kernels follow MLX's GPU rule, where a group's
    maximum counts from 0 (its CPU rule counts from the group's own maximum)."""
    _checked_blocks(k, v, bits, group_size)
    tables = checked_tables(k, cos, sin, rotary_dims, two_d)
    kind = chosen("cache-write", choice, _kv_block_threads(k, group_size))
    if kind is None:
        return pack_blocks(rotated_reference(k, *tables, rotary_dims, interleaved), v, bits, group_size)
    return _kv_block_launch(kind, k, v, tables, interleaved, bits, group_size)


def quantize_kv_blocks(
    k: mx.array, v: mx.array, *, bits: int, group_size: int, choice: str | None = None
) -> tuple[Packed, Packed]:
    """`rope_kv_block` for keys already rotated: k and v (B, H, L, D), L a multiple of
    `group_size`, quantized into the cache's packed layout in one launch (the kernel's, else
    `mx.quantize` of k transposed and of v), as `rope_kv_block` returns them."""
    _checked_blocks(k, v, bits, group_size)
    kind = chosen("cache-write", choice, _kv_block_threads(k, group_size))
    if kind is None:
        return pack_blocks(k, v, bits, group_size)
    return _kv_block_launch(kind, k, v, None, False, bits, group_size)
