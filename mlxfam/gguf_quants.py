"""GGUF tensor data -> MLX arrays, block-quantized types kept quantized (never expanded to float16).

Every supported block type is affine per sub-block: value = scale * code + bias, codes unsigned.
- Sub-blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) are exactly MLX affine quantization at group
  size 32 (`mx.quantize` layout: codes packed little-endian into uint32 rows, one scale and bias per group).
- Sub-blocks of 16 (Q6_K, Q3_K, Q2_K) are not: MLX groups are 32/64/128. They become two group-32 matrices,
  one holding the even sub-blocks of each group and the other the odd ones, the other half of each group
  filled with the code whose value is exactly zero (Q6_K 32, Q3_K 4, Q2_K 0 with bias 0); the product is
  the sum of two quantized matmuls. Q2_K's per-sub-block minimum cannot be zeroed that way, so it is kept
  as `sub_block_offsets` [rows, cols/16], added through x summed over each 16 inputs.
Scales and biases are float16 where every one of them is exactly a float16 (the float16 `d`/`m` of the
32-value types, and their multiples -8d, -16d, -128d unless they overflow), else float32 (the K types'
d * sub-scale products need up to 18 significant bits). In float32 every scale * code and every bias is
exact, so `dequantize()` equals llama.cpp's own dequantization bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import MlxfamError
from .gguf_reader import ELEMENT_DTYPES, GGML_TYPES, TensorInfo

GROUP_SIZE = 32
_PACK_CHUNK_VALUES = 1 << 22  # codes packed per step, bounding the packer's uint64 scratch to 32 MiB


@dataclass(frozen=True)
class AffineMatrix:
    """One matrix in `mx.quantize` layout (group size 32)."""

    weight: mx.array  # uint32 [..., cols * bits / 32]
    scales: mx.array  # [..., cols / 32]
    biases: mx.array  # [..., cols / 32]
    bits: int

    def dequantize(self) -> mx.array:
        f32 = mx.float32
        return mx.dequantize(self.weight, self.scales.astype(f32), self.biases.astype(f32), GROUP_SIZE, self.bits)

    def matmul(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, True, GROUP_SIZE, self.bits)


@dataclass(frozen=True)
class GGUFQuantized:
    """A block-quantized GGUF tensor: the sum of `parts`, plus `sub_block_offsets` repeated over each 16
    values where present (Q2_K). Single-part types load straight into MLX's quantized layers."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    parts: tuple[AffineMatrix, ...]
    sub_block_offsets: mx.array | None = None  # float32 [..., cols / 16]

    def dequantize(self) -> mx.array:
        """The float32 values, exactly as llama.cpp dequantizes them."""
        values = self.parts[0].dequantize()
        for part in self.parts[1:]:
            values = values + part.dequantize()
        if self.sub_block_offsets is not None:
            values = values + mx.repeat(self.sub_block_offsets, 16, axis=-1)
        return values.reshape(self.shape)

    def matmul(self, x: mx.array) -> mx.array:
        """x @ W.T for a matrix W of this tensor's shape [out, in]."""
        y = self.parts[0].matmul(x)
        for part in self.parts[1:]:
            y = y + part.matmul(x)
        if self.sub_block_offsets is not None:
            sums = x.reshape(*x.shape[:-1], -1, 16).sum(axis=-1)
            y = y + sums @ self.sub_block_offsets.astype(sums.dtype).T
        return y


@dataclass(frozen=True)
class _Blocks:
    """Decoded blocks: codes [n, block] and per-sub-block scales/biases [n, block / sub_block]."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    sub_block: int = 32
    zero_code: int = 0  # 16-value types: the code whose value is 0 (scale * zero_code + bias == 0)
    offsets: np.ndarray | None = None  # Q2_K: -dmin * m per sub-block


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """Bytes in chunks of `chunk`: each chunk's low nibbles, then its high nibbles."""
    n = qs.shape[0]
    halves = qs.reshape(n, -1, 1, chunk) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (halves & 0x0F).reshape(n, -1)


def _crumbs(qs: np.ndarray, chunk: int, bits: int) -> np.ndarray:
    """Bytes in chunks of `chunk`, each holding 8/bits values: all bit-fields 0 of the chunk, then 1, ..."""
    n = qs.shape[0]
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((qs.reshape(n, -1, 1, chunk) >> shifts) & ((1 << bits) - 1)).reshape(n, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit i of a 32-bit field per block, for i < count, as [n, count]."""
    n = qh.shape[0]
    return (qh.copy().view("<u4").reshape(n, 1) >> np.arange(count, dtype=np.uint32)).astype(np.uint8) & 1


def _q4_0(b):
    d = _f16(b, 0)
    return _Blocks(_nibbles(b[:, 2:18], 16), d, -8 * d, 4)


def _q4_1(b):
    return _Blocks(_nibbles(b[:, 4:20], 16), _f16(b, 0), _f16(b, 2), 4)


def _q5_0(b):
    d = _f16(b, 0)
    return _Blocks(_nibbles(b[:, 6:22], 16) | (_high_bits(b[:, 2:6], 32) << 4), d, -16 * d, 5)


def _q5_1(b):
    return _Blocks(_nibbles(b[:, 8:24], 16) | (_high_bits(b[:, 4:8], 32) << 4), _f16(b, 0), _f16(b, 2), 5)


def _q8_0(b):
    d = _f16(b, 0)
    return _Blocks((b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d, 8)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4)."""
    low, high, extra = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([low & 63, (extra & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (extra >> 4) | ((high >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k(b):
    scales, mins = _k_scales_mins(b[:, 4:16])
    return _Blocks(_nibbles(b[:, 16:144], 32), _f16(b, 0) * scales, -(_f16(b, 2) * mins), 4)


def _q5_k(b):
    scales, mins = _k_scales_mins(b[:, 4:16])
    n = b.shape[0]
    high = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    codes = _nibbles(b[:, 48:176], 32) | (high.reshape(n, -1) << 4)
    return _Blocks(codes, _f16(b, 0) * scales, -(_f16(b, 2) * mins), 5)


def _q6_k(b):
    codes = _nibbles(b[:, 0:128], 64) | (_crumbs(b[:, 128:192], 32, 2) << 4)
    scales = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    return _Blocks(codes, scales, -32 * scales, 6, sub_block=16, zero_code=32)


def _q3_k(b):
    n = b.shape[0]
    s = b[:, 96:108]
    low = _nibbles(s[:, 0:8], 8)
    high = _crumbs(s[:, 8:12], 4, 2)
    scales = _f16(b, 108) * (((low | (high << 4)).astype(np.int8) - 32).astype(np.float32))
    high_bit = (b[:, 0:32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    codes = _crumbs(b[:, 32:96], 32, 2) | (high_bit.reshape(n, -1) << 2)  # value = scale * (code - 4)
    return _Blocks(codes, scales, -4 * scales, 3, sub_block=16, zero_code=4)


def _q2_k(b):
    s = b[:, 0:16]
    scales = _f16(b, 80) * (s & 0x0F).astype(np.float32)
    offsets = -(_f16(b, 82) * (s >> 4).astype(np.float32))
    return _Blocks(_crumbs(b[:, 16:80], 32, 2), scales, np.zeros_like(scales), 2, sub_block=16, offsets=offsets)


_DECODERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
}
_FLOAT_TYPES = ("F32", "F16", "BF16")  # kept as stored
SUPPORTED_TYPES = (*_FLOAT_TYPES, *_DECODERS)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> MLX's packing: a little-endian bit stream of `bits`-bit fields per row."""
    rows, cols = codes.shape
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    step = max(1, _PACK_CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        chunk = codes[start : start + step]
        words = np.bitwise_or.reduce(chunk.reshape(len(chunk), -1, 8).astype(np.uint64) << shifts, axis=-1)
        fields = words.view(np.uint8).reshape(len(chunk), -1, 8)[..., :bits]  # 8 codes fill `bits` bytes
        packed[start : start + step] = fields.reshape(len(chunk), -1).view(np.uint32)
    return packed


def _exact_dtype(*arrays: np.ndarray) -> np.dtype:
    """float16 when every value is exactly a float16, else float32."""
    exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays)
    return np.dtype(np.float16 if exact else np.float32)


def _affine(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, lead: tuple) -> AffineMatrix:
    dtype = _exact_dtype(scales, biases)
    return AffineMatrix(
        mx.array(_pack(codes, bits).reshape(*lead, -1)),
        mx.array(scales.astype(dtype).reshape(*lead, -1)),
        mx.array(biases.astype(dtype).reshape(*lead, -1)),
        bits,
    )


def _quantized(info: TensorInfo, blocks: _Blocks) -> GGUFQuantized:
    cols = info.shape[-1]
    lead = info.shape[:-1] or (1,)
    codes = blocks.codes.reshape(-1, cols)
    scales = blocks.scales.reshape(codes.shape[0], -1)
    biases = blocks.biases.reshape(codes.shape[0], -1)
    if blocks.sub_block == GROUP_SIZE:
        parts = (_affine(codes, scales, biases, blocks.bits, lead),)
    else:  # two 16-value sub-blocks per group: the even ones in one matrix, the odd ones in the other
        pairs = codes.reshape(codes.shape[0], -1, 2, 16)
        parts = []
        for half in (0, 1):
            kept = np.full_like(pairs, blocks.zero_code)
            kept[:, :, half] = pairs[:, :, half]
            parts.append(_affine(kept.reshape(codes.shape), scales[:, half::2], biases[:, half::2], blocks.bits, lead))
        parts = tuple(parts)
    offsets = None
    if blocks.offsets is not None:
        offsets = mx.array(blocks.offsets.reshape(*lead, -1).astype(np.float32))
    return GGUFQuantized(info.name, info.type_name, info.shape, parts, offsets)


def tensor_to_mlx(info: TensorInfo, raw: np.ndarray) -> mx.array | GGUFQuantized:
    """A tensor's bytes (e.g. `GGUFFile.data(name)`) -> an mx.array (F32/F16/BF16, as stored) or a
    GGUFQuantized (block types); any other type is an MlxfamError naming the tensor and its type."""
    name = info.type_name if info.ggml_type in GGML_TYPES else f"unknown type {info.ggml_type}"
    if name not in SUPPORTED_TYPES:
        raise MlxfamError(
            f"GGUF tensor {info.name!r} has type {name}, which mlxfam cannot load "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.nbytes != info.nbytes:
        raise MlxfamError(
            f"GGUF tensor {info.name!r}: {data.nbytes} bytes of data, its {name} shape needs {info.nbytes}"
        )
    if name in _FLOAT_TYPES:
        array = mx.array(data.view(ELEMENT_DTYPES[name]).reshape(info.shape))
        return array.view(mx.bfloat16) if name == "BF16" else array
    blocks = data.reshape(-1, GGML_TYPES[info.ggml_type].type_size)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf scales stay NaN/inf, as in llama.cpp
        return _quantized(info, _DECODERS[name](blocks))
