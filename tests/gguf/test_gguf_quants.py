"""GGUF block types kept quantized, against llama.cpp's gguf-py: what mlxfam's representation dequantizes
to equals `gguf.quants.dequantize` exactly (float32), and its quantized matmul equals x @ W.T."""

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mlxfam.errors import MlxfamError
from mlxfam.gguf_quants import SUPPORTED_TYPES, GGUFQuantized, tensor_to_mlx
from mlxfam.gguf_reader import TensorInfo

# Byte offsets of each block type's float16 scale fields (d, and dmin / m where the type has one), from
# ggml-common.h's block structs.
SCALE_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
BLOCK_TYPES = list(SCALE_FIELDS)
QUANTIZABLE_BY_GGUF_PY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def info_for(type_name: str, shape: tuple[int, ...], name="blk.0.ffn_down.weight") -> TensorInfo:
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    return TensorInfo(name, Q[type_name].value, shape, 0, int(np.prod(shape)) // block * size)


def random_blocks(type_name: str, shape: tuple[int, ...], seed: int, scale_exponent: int = -6) -> np.ndarray:
    """Random block bytes with finite float16 scale fields of magnitude about 2**scale_exponent."""
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for start in SCALE_FIELDS[type_name]:
        scale = (rng.uniform(-2, 2, len(blocks)) * 2.0**scale_exponent).astype(np.float16)
        blocks[:, start : start + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], -1)


def check_exact(type_name: str, raw: np.ndarray, shape: tuple[int, ...]) -> GGUFQuantized:
    expected = gguf.quants.dequantize(raw, Q[type_name]).reshape(shape)
    loaded = tensor_to_mlx(info_for(type_name, shape), raw)
    assert isinstance(loaded, GGUFQuantized) and loaded.shape == shape
    got = np.array(loaded.dequantize())
    assert got.dtype == np.float32 and np.array_equal(got, expected), np.abs(got - expected).max()
    return loaded


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
@pytest.mark.parametrize("scale_exponent", [-6, -20, 10])  # ordinary, float16-subnormal, large scales
def test_random_blocks_dequantize_exactly(type_name, scale_exponent):
    shape = (6, 512)
    check_exact(
        type_name, random_blocks(type_name, shape, seed=scale_exponent + 100, scale_exponent=scale_exponent), shape
    )


@pytest.mark.parametrize("type_name", QUANTIZABLE_BY_GGUF_PY)
def test_quantized_floats_dequantize_exactly(type_name):
    shape = (8, 256)
    weights = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.05
    loaded = check_exact(type_name, gguf.quants.quantize(weights, Q[type_name]), shape)
    # d and its multiples are float16 values, so these types keep float16 scales and biases.
    assert all(part.scales.dtype == mx.float16 and part.biases.dtype == mx.float16 for part in loaded.parts)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_types_use_float32_scales(type_name):
    loaded = tensor_to_mlx(info_for(type_name, (4, 256)), random_blocks(type_name, (4, 256), seed=3))
    assert all(part.scales.dtype == mx.float32 for part in loaded.parts)


@pytest.mark.parametrize(
    "type_name, parts, bits, offsets",
    [
        ("Q4_0", 1, 4, False),
        ("Q5_K", 1, 5, False),
        ("Q8_0", 1, 8, False),
        ("Q6_K", 2, 6, False),
        ("Q3_K", 2, 3, False),
        ("Q2_K", 2, 2, True),
    ],
)
def test_layout(type_name, parts, bits, offsets):
    shape = (3, 512)
    loaded = tensor_to_mlx(info_for(type_name, shape), random_blocks(type_name, shape, seed=5))
    assert len(loaded.parts) == parts and (loaded.sub_block_offsets is not None) == offsets
    for part in loaded.parts:
        assert part.bits == bits and part.weight.dtype == mx.uint32
        assert part.weight.shape == (3, 512 * bits // 32) and part.scales.shape == (3, 16) == part.biases.shape
    if offsets:
        assert loaded.sub_block_offsets.shape == (3, 32)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_matmul_matches_dequantized(type_name):
    shape = (24, 512)
    raw = random_blocks(type_name, shape, seed=7)
    weights = gguf.quants.dequantize(raw, Q[type_name]).reshape(shape).astype(np.float64)
    x = np.random.default_rng(8).standard_normal((5, shape[1])).astype(np.float32)
    got = np.array(tensor_to_mlx(info_for(type_name, shape), raw).matmul(mx.array(x)))
    expected = x.astype(np.float64) @ weights.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(weights).T) + 1e-30
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q2_K"])
@pytest.mark.parametrize("shape", [(2, 3, 256), (512,)])
def test_expert_stacks_and_vectors(type_name, shape):
    check_exact(type_name, random_blocks(type_name, shape, seed=9), shape)


@pytest.mark.parametrize("type_name, dtype", [("F32", mx.float32), ("F16", mx.float16), ("BF16", mx.bfloat16)])
def test_float_types_stay_as_stored(type_name, dtype):
    values = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q[type_name]) if type_name != "F32" else values
    raw = raw.view(np.uint8)
    info = TensorInfo("w", Q[type_name].value, (3, 8), 0, raw.nbytes)
    loaded = tensor_to_mlx(info, raw)
    assert loaded.dtype == dtype and loaded.shape == (3, 8)
    expected = gguf.quants.dequantize(raw, Q[type_name]).reshape(3, 8)
    assert np.array_equal(np.array(loaded.astype(mx.float32)), expected)


@pytest.mark.parametrize(
    "type_id, type_name",
    [(20, "IQ4_NL"), (16, "IQ2_XXS"), (34, "TQ1_0"), (9, "Q8_1"), (15, "Q8_K"), (99, "unknown type 99")],
)
def test_unsupported_types_name_tensor_type_and_supported(type_id, type_name):
    info = TensorInfo("blk.3.attn_q.weight", type_id, (2, 256), 0, 64)
    with pytest.raises(MlxfamError) as caught:
        tensor_to_mlx(info, np.zeros(64, np.uint8))
    message = str(caught.value)
    assert "'blk.3.attn_q.weight'" in message and type_name in message
    assert f"supported: {', '.join(SUPPORTED_TYPES)}" in message


def test_wrong_data_size():
    with pytest.raises(MlxfamError, match="'blk.0.ffn_down.weight': 10 bytes of data"):
        tensor_to_mlx(info_for("Q4_0", (2, 64)), np.zeros(10, np.uint8))
