"""RoPE kernels and their pure-MLX reference against an independent float64 numpy rotation.

Every numeric test runs twice: choice "reference" (MLX ops, any device) and "kernel" (the Metal or
CUDA kernel, when `mlxfam.kernels.backend()` finds a GPU; skipped with the reason otherwise).
The numpy oracle turns explicit pairs by cos/sin of positions x inverse frequencies; the quantized
cache write is decoded by its own bit unpacker and must land within one quantization step.
"""

import re
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
from kernel_compile import (
    GXX,
    NVCC,
    Emulation,
    assert_one_algorithm,
    cuda_source,
    emulated_function,
    kernel_function,
    nvcc_compile,
)
from mlxfam.kernels import backend, kv_write, sections
from mlxfam.kernels import rope as kernels_rope
from mlxfam.kernels.kv_write import quantize_kv_blocks, rope_kv_block
from mlxfam.kernels.rope import (
    MAX_THREADS,
    kernel_calls,
    kernel_unsupported,
    rope,
    rope_qk,
    rope_table,
)

from mlxfam.cache import KVCache
from mlxfam.errors import MlxfamError
from mlxfam.kv_layout import KV_BITS, KV_GROUP_SIZES
from mlxfam.models.rope import _llama3_inv_freq, _yarn, default_inv_freq

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
UNIT_ROUNDOFF = {dtype: float(mx.finfo(dtype).eps) / 2 for dtype in DTYPES.values()}
# fp32 angles (positions up to ~40 x inv_freq) and the fp32 rotation, on values of magnitude ~4.
FP32_SLOP = 5e-5
OFFSETS = (0, 29)  # per-batch-row start positions: two rows, two different offsets
PAIRINGS = {"half-split": False, "interleaved": True}


@pytest.fixture(params=["reference", "kernel"])
def choice(request) -> str:
    if request.param == "kernel" and backend("auto") is None:
        pytest.skip(f"no kernel backend: MLX's default device is {mx.default_device()}, not a Metal or CUDA GPU")
    return request.param


# --- the independent numpy side ----------------------------------------------------------------------


def numpy_rope(x, positions, inv_freq, *, rotary_dims, interleaved, two_d=False, scale=1.0):
    """x (B, H, L, D) float64; positions (B or 1, L), or (2, B or 1, L) with two_d: pair by pair."""
    out = x.copy()
    streams = 2 if two_d else 1
    part_dims = x.shape[-1] // streams
    half = rotary_dims // 2
    for stream in range(streams):
        angles = (positions[stream] if two_d else positions)[:, None, :, None] * inv_freq  # (B, 1, L, R/2)
        for i in range(half):
            first, second = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            first, second = first + stream * part_dims, second + stream * part_dims
            c, s = np.cos(angles[..., i]) * scale, np.sin(angles[..., i]) * scale
            a, b = x[..., first], x[..., second]
            out[..., first], out[..., second] = a * c - b * s, b * c + a * s
    return out


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """(..., W) uint32 words -> (..., W * 32 / bits) codes, the lowest bits holding the first."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return ((words[..., None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(*words.shape[:-1], -1)


def as_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a).astype(np.float64)


def assert_within_a_step(packed, expected: np.ndarray, bits: int, group_size: int, dtype) -> None:
    """`packed` (data, scales, biases) over the last axis decodes to `expected` within one quantization
    step (the anchored edge can clip by one), plus the rounding of the stored scale, bias and input."""
    data, scales, biases = (np.array(a) if a.dtype == mx.uint32 else as_numpy(a) for a in packed)
    codes = unpack(data, bits)
    scales, biases = (np.repeat(a, group_size, axis=-1) for a in (scales, biases))
    u = UNIT_ROUNDOFF[dtype]
    bound = np.abs(scales) * (1 + ((1 << bits) - 1) * u) + u * (np.abs(biases) + np.abs(expected)) + FP32_SLOP
    excess = np.abs(scales * codes + biases - expected) - bound
    assert excess.max() <= 0, f"{(excess > 0).sum()} of {excess.size} decoded elements off by more than a step"


def assert_same_quantization(got, expected, bits: int, dtype) -> None:
    """Same packed codes, scales and biases as mx.quantize gave; a code may differ by one where the
    kernel's fp32 rotation (fused multiply-adds) rounds its input one ulp away, in a few places."""
    got_codes, expected_codes = (unpack(np.array(packed[0]), bits).astype(np.int64) for packed in (got, expected))
    assert np.abs(got_codes - expected_codes).max() <= 1
    assert (got_codes != expected_codes).mean() <= 0.01
    for got_part, expected_part in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(
            as_numpy(got_part), as_numpy(expected_part), rtol=4 * UNIT_ROUNDOFF[dtype], atol=1e-6
        )


def random_tensor(shape, dtype, seed: int, shift=0.0) -> tuple[mx.array, np.ndarray]:
    """A tensor in `dtype` (normal, plus `shift`) and its exact float64 values: the oracle starts
    from the same numbers."""
    x = mx.array((np.random.default_rng(seed).normal(size=shape) + shift).astype(np.float32)).astype(dtype)
    return x, as_numpy(x)


def row_positions(length: int, offsets=OFFSETS) -> np.ndarray:
    return np.asarray(offsets)[:, None] + np.arange(length)


def assert_rotated(got: mx.array, expected: np.ndarray, dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 2 * UNIT_ROUNDOFF[dtype] + FP32_SLOP
    np.testing.assert_allclose(as_numpy(got), expected, rtol=tolerance, atol=tolerance)


# --- rotation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rope_matches_numpy(choice, dtype, head_dim, rotary, pairing):
    dtype, interleaved = DTYPES[dtype], PAIRINGS[pairing]
    rotary_dims = head_dim if rotary == "full" else head_dim // 4 * 2  # Qwen-style rotary_pct 0.5
    inv_freq = default_inv_freq(rotary_dims, 10000.0)
    x, x64 = random_tensor((2, 3, 4, head_dim), dtype, seed=head_dim)
    positions = row_positions(4)
    out = rope(x, *rope_table(positions, inv_freq), rotary_dims=rotary_dims, interleaved=interleaved, choice=choice)
    expected = numpy_rope(x64, positions, inv_freq, rotary_dims=rotary_dims, interleaved=interleaved)
    assert_rotated(out, expected, dtype)
    if rotary == "partial":
        assert mx.array_equal(out[..., rotary_dims:], x[..., rotary_dims:])


def _frequency_table(name: str, dims: int) -> tuple[np.ndarray, float]:
    """(inv_freq, attention factor) of each rotary scaling, from mlxfam.models.rope's formulas."""
    base, scaling = 10000.0, {"factor": 4.0, "original_max_position_embeddings": 16}
    if name == "yarn":
        return _yarn(dims, base, scaling, 64)
    tables = {
        "default": lambda: default_inv_freq(dims, base),
        "linear": lambda: default_inv_freq(dims, base) / scaling["factor"],
        "dynamic": lambda: default_inv_freq(dims, base * 3.0 ** (dims / (dims - 2))),  # NTK's grown base
        "llama3": lambda: _llama3_inv_freq(default_inv_freq(dims, base), scaling),
        "freq_factors": lambda: default_inv_freq(dims, base) / np.linspace(1.0, 8.0, dims // 2),  # GGUF rope_freqs
    }
    return tables[name](), 1.0


@pytest.mark.parametrize("scaling", ["default", "linear", "dynamic", "llama3", "yarn", "freq_factors"])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rope_frequency_tables(choice, scaling, pairing):
    inv_freq, attention_factor = _frequency_table(scaling, 32)
    assert (attention_factor != 1.0) == (scaling == "yarn")
    x, x64 = random_tensor((2, 2, 5, 64), mx.float32, seed=7)
    positions = row_positions(5)
    cos, sin = rope_table(positions, inv_freq, scale=attention_factor)
    out = rope(x, cos, sin, rotary_dims=32, interleaved=PAIRINGS[pairing], choice=choice)
    expected = numpy_rope(
        x64, positions, inv_freq, rotary_dims=32, interleaved=PAIRINGS[pairing], scale=attention_factor
    )
    assert_rotated(out, expected, mx.float32)


def test_rope_table_shared_by_the_batch(choice):
    """Positions (1, L): every batch row turns by the same table."""
    x, x64 = random_tensor((2, 2, 3, 64), mx.float16, seed=3)
    positions = np.arange(11, 14)[None]
    inv_freq = default_inv_freq(64, 10000.0)
    out = rope(x, *rope_table(positions, inv_freq), rotary_dims=64, interleaved=False, choice=choice)
    assert_rotated(out, numpy_rope(x64, positions, inv_freq, rotary_dims=64, interleaved=False), mx.float16)


def chatglm_positions(length: int) -> np.ndarray:
    """(2, B, L) 2D positions as ChatGLM-6B lays them out: a context counting up, then every
    generated token at the mask position with block positions 1, 2, ...; one layout per batch row."""
    rows = []
    for context in (3, 5):
        index = np.arange(length)
        rows.append((np.where(index < context, index, context - 1), np.where(index < context, 0, index - context + 1)))
    return np.stack([np.stack(stream) for stream in zip(*rows)])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rotary", ["half", "partial"])  # "half": ChatGLM-6B, R = D/2 fills each half
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rope_2d(choice, dtype, head_dim, rotary, pairing):
    dtype, interleaved = DTYPES[dtype], PAIRINGS[pairing]
    rotary_dims = head_dim // 2 if rotary == "half" else head_dim // 4
    inv_freq = default_inv_freq(rotary_dims, 10000.0)
    positions = chatglm_positions(7)
    x, x64 = random_tensor((2, 2, 7, head_dim), dtype, seed=head_dim + 1)
    cos, sin = rope_table(positions, inv_freq)
    out = rope(x, cos, sin, rotary_dims=rotary_dims, interleaved=interleaved, two_d=True, choice=choice)
    expected = numpy_rope(x64, positions, inv_freq, rotary_dims=rotary_dims, interleaved=interleaved, two_d=True)
    assert_rotated(out, expected, dtype)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rope_qk(choice, heads, pairing):
    """q and k with their own head counts, in one launch; both are (B, L, H, D) projections seen as
    (B, H, L, D), so the kernels read them through strides."""
    interleaved = PAIRINGS[pairing]
    (q, q64), (k, k64) = (random_tensor((2, 6, h, 64), mx.bfloat16, seed=seed) for seed, h in enumerate(heads))
    q, k, q64, k64 = q.swapaxes(1, 2), k.swapaxes(1, 2), q64.swapaxes(1, 2), k64.swapaxes(1, 2)
    positions = row_positions(6)
    inv_freq = default_inv_freq(64, 500000.0)
    q_out, k_out = rope_qk(
        q, k, *rope_table(positions, inv_freq), rotary_dims=64, interleaved=interleaved, choice=choice
    )
    for got, x64 in ((q_out, q64), (k_out, k64)):
        assert_rotated(got, numpy_rope(x64, positions, inv_freq, rotary_dims=64, interleaved=interleaved), mx.bfloat16)


# --- the fused write of a quantizing cache ----------------------------------------------------------------


def kv_block_inputs(shape, dtype, rotary_dims: int):
    """Keys and values with some groups all of one sign (the edge anchoring of mx.quantize matters):
    the keys' pass-through channels and the values' second half of tokens are shifted by -3."""
    channel_shift = np.where(np.arange(shape[-1]) >= rotary_dims, -3.0, 0.0)
    token_shift = np.where(np.arange(shape[2]) >= shape[2] // 2, -3.0, 0.0)[:, None]
    return (*random_tensor(shape, dtype, 11, channel_shift), *random_tensor(shape, dtype, 12, token_shift))


def assert_kv_block(keys, values, rotated: np.ndarray, v64: np.ndarray, bits: int, group_size: int, dtype) -> None:
    """The packed cache write (keys per channel, values per token) has the cache's shapes and dtypes
    and decodes within a step to the numpy-rotated keys and to the values."""
    batch, heads, length, head_dim = v64.shape
    assert keys[0].shape == (batch, heads, head_dim, length * bits // 32) and keys[0].dtype == mx.uint32
    assert keys[1].shape == keys[2].shape == (batch, heads, head_dim, length // group_size) and keys[1].dtype == dtype
    assert values[0].shape == (batch, heads, length, head_dim * bits // 32) and values[0].dtype == mx.uint32
    assert values[1].shape == values[2].shape == (batch, heads, length, head_dim // group_size)
    assert values[1].dtype == dtype
    assert_within_a_step(keys, rotated.swapaxes(-1, -2), bits, group_size, dtype)
    assert_within_a_step(values, v64, bits, group_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", KV_GROUP_SIZES)
@pytest.mark.parametrize("bits", KV_BITS)
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_rope_kv_block(choice, dtype, group_size, bits, pairing, two_d):
    dtype, interleaved = DTYPES[dtype], PAIRINGS[pairing]
    length, head_dim = 2 * group_size, 64
    rotary_dims = 16 if two_d else 48  # partial: some channels pass through
    k, k64, v, v64 = kv_block_inputs((2, 2, length, head_dim), dtype, rotary_dims)
    inv_freq = default_inv_freq(rotary_dims, 10000.0)
    positions = chatglm_positions(length) if two_d else row_positions(length)
    cos, sin = rope_table(positions, inv_freq)
    options = {"rotary_dims": rotary_dims, "interleaved": interleaved, "two_d": two_d}
    keys, values = rope_kv_block(k, v, cos, sin, bits=bits, group_size=group_size, choice=choice, **options)
    assert_kv_block(keys, values, numpy_rope(k64, positions, inv_freq, **options), v64, bits, group_size, dtype)

    reference_keys = rope(k, cos, sin, choice="reference", **options)
    assert_same_quantization(
        keys, mx.quantize(reference_keys.swapaxes(-1, -2), group_size=group_size, bits=bits), bits, dtype
    )
    assert_same_quantization(values, mx.quantize(v, group_size=group_size, bits=bits), bits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", KV_GROUP_SIZES)
@pytest.mark.parametrize("bits", KV_BITS)
def test_quantize_kv_blocks(choice, dtype, group_size, bits):
    """The cache's write of keys already rotated: the keys stored as given, through a view's strides
    (a slice of a longer run, as the cache hands over its full blocks)."""
    dtype = DTYPES[dtype]
    length, head_dim = 2 * group_size, 128
    k, k64, v, v64 = kv_block_inputs((2, 2, length + 5, head_dim), dtype, rotary_dims=64)
    k, k64, v, v64 = k[:, :, :length], k64[:, :, :length], v[:, :, :length], v64[:, :, :length]
    keys, values = quantize_kv_blocks(k, v, bits=bits, group_size=group_size, choice=choice)
    assert_kv_block(keys, values, k64, v64, bits, group_size, dtype)
    expected_keys = mx.quantize(k.swapaxes(-1, -2), group_size=group_size, bits=bits)
    assert_same_quantization(keys, expected_keys, bits, dtype)
    assert_same_quantization(values, mx.quantize(v, group_size=group_size, bits=bits), bits, dtype)


# --- bad input ------------------------------------------------------------------------------------------


def _tables(length=4, rotary_dims=8, batch=2, two_d=False):
    positions = np.zeros((2,) * two_d + (batch, length))
    return rope_table(positions, default_inv_freq(rotary_dims, 10000.0))


BAD_CALLS = {
    "odd rotary dims": (lambda x: rope(x, *_tables(rotary_dims=8), rotary_dims=7, interleaved=False), "positive even"),
    "rotary dims past the head": (
        lambda x: rope(x, *_tables(rotary_dims=18), rotary_dims=18, interleaved=False),
        "does not fit",
    ),
    "2D rotary dims past a half": (
        lambda x: rope(x, *_tables(rotary_dims=10, two_d=True), rotary_dims=10, interleaved=False, two_d=True),
        "each half",
    ),
    "table of another length": (
        lambda x: rope(x, *_tables(length=5), rotary_dims=8, interleaved=False),
        "tables have shape",
    ),
    "table of another batch": (
        lambda x: rope(x, *_tables(batch=3), rotary_dims=8, interleaved=False),
        "tables have shape",
    ),
    "1D table for 2D rotary": (
        lambda x: rope(x, *_tables(), rotary_dims=8, interleaved=False, two_d=True),
        "tables have shape",
    ),
    "integer tensor": (lambda x: rope(x.astype(mx.int32), *_tables(), rotary_dims=8, interleaved=False), "rope takes"),
    "3D tensor": (lambda x: rope(x[0], *_tables(), rotary_dims=8, interleaved=False), "expected (batch, heads"),
    "q and k of different lengths": (
        lambda x: rope_qk(x, x[:, :, :3], *_tables(), rotary_dims=8, interleaved=False),
        "differ in batch, length",
    ),
    "2D positions of three streams": (lambda x: rope_table(np.zeros((3, 2, 4)), np.ones(4)), "rope positions"),
}

BAD_BLOCKS = {
    "a partial block": ((2, 1, 48, 64), 4, 32, "not a multiple of 32"),
    "head_dim not in groups": ((2, 1, 64, 80), 4, 64, "head_dim 80"),
    "3 bits": ((2, 1, 64, 64), 3, 32, "bits must be one of"),
    "group size 128": ((2, 1, 128, 128), 4, 128, "group_size must be one of"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_refused(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(MlxfamError, match=re.escape(message)):
        call(mx.zeros((2, 2, 4, 16)))


@pytest.mark.parametrize("case", BAD_BLOCKS)
def test_bad_cache_block_is_refused(case):
    shape, bits, group_size, message = BAD_BLOCKS[case]
    x = mx.zeros(shape)
    with pytest.raises(MlxfamError, match=re.escape(message)):
        rope_kv_block(
            x, x, *_tables(length=shape[2]), rotary_dims=8, interleaved=False, bits=bits, group_size=group_size
        )
    with pytest.raises(MlxfamError, match=re.escape(message)):
        quantize_kv_blocks(x, x, bits=bits, group_size=group_size)


@pytest.mark.skipif(backend("auto") is not None, reason="a kernel backend runs here")
@pytest.mark.parametrize("launcher", ["rope", "rope_qk", "rope_kv_block", "quantize_kv_blocks"])
def test_kernel_choice_refuses_to_run_without_a_gpu(launcher):
    x = mx.zeros((2, 1, 32, 32))
    options = dict(rotary_dims=8, interleaved=False, choice="kernel")
    calls = {
        "rope": lambda: rope(x, *_tables(length=32), **options),
        "rope_qk": lambda: rope_qk(x, x, *_tables(length=32), **options),
        "rope_kv_block": lambda: rope_kv_block(x, x, *_tables(length=32), bits=4, group_size=32, **options),
        "quantize_kv_blocks": lambda: quantize_kv_blocks(x, x, bits=4, group_size=32, choice="kernel"),
    }
    with pytest.raises(MlxfamError, match="neither the Metal nor the CUDA kernels run"):
        calls[launcher]()


def test_kernel_takes_every_launch_a_grid_holds():
    assert kernel_unsupported(1) is None and kernel_unsupported(MAX_THREADS) is None
    assert "nothing to compute" in kernel_unsupported(0)
    assert "more than one launch grid holds" in kernel_unsupported(MAX_THREADS + 1)


# --- the sources ------------------------------------------------------------------------------------------


def test_metal_and_cuda_sources_are_one_text():
    """The rotation and the cache write: one text after each platform's prelude (`assert_one_algorithm`)."""
    assert list(sections("cuda", *kv_write.SOURCES)) == ["header", "rope", "rope_qk", "rope_kv_block"]
    assert_one_algorithm(*kv_write.SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    """Every launch the Python side can request, wrapped in the signature mx.fast.cuda_kernel generates."""
    cuda = sections("cuda", *kv_write.SOURCES)
    calls = kernel_calls() + kv_write.kernel_calls()
    # Per dtype: rope and rope_qk per pairing, rope_kv_block per packing, rotating by either pairing or not.
    assert len(calls) == len(DTYPES) * (2 * 2 + 3 * len(KV_BITS) * len(KV_GROUP_SIZES))
    functions = [
        kernel_function(call.name, cuda[call.kernel], list(call.inputs), list(call.outputs), list(call.template))
        for call in calls
    ]
    nvcc_compile(cuda_source(cuda["header"], functions), tmp_path)


# --- the CUDA kernels, run on the CPU ------------------------------------------------------------------


def emulated_rope(dtype, pairing: str, head_dim: int, rotary_dims: int, two_d=False, table_batch=2):
    """rope of a (2, 3, 5, head_dim) tensor: (launch, check of its output)."""
    interleaved = PAIRINGS[pairing]
    x, x64 = random_tensor((2, 3, 5, head_dim), dtype, seed=head_dim + two_d)
    positions = chatglm_positions(5) if two_d else row_positions(5, OFFSETS[:table_batch])
    inv_freq = default_inv_freq(rotary_dims, 10000.0)
    options = {"rotary_dims": rotary_dims, "interleaved": interleaved, "two_d": two_d}
    expected = numpy_rope(x64, positions, inv_freq, **options)
    return (
        lambda: rope(x, *rope_table(positions, inv_freq), choice="kernel", **options),
        lambda out: assert_rotated(out, expected, dtype),
    )


def emulated_rope_qk(dtype, pairing: str, heads):
    """rope_qk of q (2, Hq, 6, 64) and k (2, Hk, 6, 64), both transposed (B, L, H, D) projections."""
    interleaved = PAIRINGS[pairing]
    (q, q64), (k, k64) = (random_tensor((2, 6, h, 64), dtype, seed=seed) for seed, h in enumerate(heads))
    q, k, q64, k64 = q.swapaxes(1, 2), k.swapaxes(1, 2), q64.swapaxes(1, 2), k64.swapaxes(1, 2)
    positions, inv_freq = row_positions(6), default_inv_freq(64, 500000.0)
    expected = [numpy_rope(x64, positions, inv_freq, rotary_dims=64, interleaved=interleaved) for x64 in (q64, k64)]

    def check(outputs):
        for got, oracle in zip(outputs, expected):
            assert_rotated(got, oracle, dtype)

    def launch():
        return rope_qk(q, k, *rope_table(positions, inv_freq), rotary_dims=64, interleaved=interleaved, choice="kernel")

    return launch, check


def emulated_kv_block(dtype, pairing: str, bits: int, group_size: int, two_d=False):
    """rope_kv_block of two blocks of (2, 1, 2 * group_size, 64) keys and values, with groups all of
    one sign (kv_block_inputs)."""
    length, rotary_dims = 2 * group_size, 16 if two_d else 48
    k, k64, v, v64 = kv_block_inputs((2, 1, length, 64), dtype, rotary_dims)
    inv_freq = default_inv_freq(rotary_dims, 10000.0)
    positions = chatglm_positions(length) if two_d else row_positions(length)
    options = {"rotary_dims": rotary_dims, "interleaved": PAIRINGS[pairing], "two_d": two_d}
    rotated = numpy_rope(k64, positions, inv_freq, **options)
    for groups in (rotated.swapaxes(-1, -2), v64):  # the case holds what it is meant to
        signs = np.sign(groups.reshape(*groups.shape[:-1], -1, group_size))
        assert (np.abs(signs.sum(axis=-1)) == group_size).any(), "no group all of one sign"

    def launch():
        return rope_kv_block(
            k, v, *rope_table(positions, inv_freq), bits=bits, group_size=group_size, choice="kernel", **options
        )

    return launch, lambda packed: assert_kv_block(*packed, rotated, v64, bits, group_size, dtype)


def emulated_quantize_blocks(dtype, bits: int, group_size: int):
    """quantize_kv_blocks (rope_kv_block with ROTATE false) of two blocks of (2, 1, 2 * group_size, 64)
    keys and values read through a view, the keys stored as given."""
    length = 2 * group_size
    k, k64, v, v64 = kv_block_inputs((2, 1, length + 3, 64), dtype, rotary_dims=32)
    k, k64, v, v64 = k[:, :, 3:], k64[:, :, 3:], v[:, :, 3:], v64[:, :, 3:]

    def launch():
        return quantize_kv_blocks(k, v, bits=bits, group_size=group_size, choice="kernel")

    return launch, lambda packed: assert_kv_block(*packed, k64, v64, bits, group_size, dtype)


# Together: both pairings, full and partial rotary (80 dims: a grid that ends mid-threadgroup), 2D,
# fp32 and fp16 (the emulation has no bfloat16), two batch rows at different offsets and a table
# shared by the batch, rope_qk with GQA and MQA, and every bits x group size of the cache write,
# rotating or not (keys already rotated: the write mlxfam's caches make).
EMULATED_CASES = {
    "rope-f32-half-split-d64": lambda: emulated_rope(mx.float32, "half-split", 64, 64),
    "rope-f16-interleaved-partial-d80": lambda: emulated_rope(mx.float16, "interleaved", 80, 40),
    "rope-f16-half-split-shared-table": lambda: emulated_rope(mx.float16, "half-split", 64, 32, table_batch=1),
    "rope-2d-f32-interleaved": lambda: emulated_rope(mx.float32, "interleaved", 64, 32, two_d=True),
    "rope-2d-f16-half-split-partial": lambda: emulated_rope(mx.float16, "half-split", 128, 32, two_d=True),
    "rope_qk-gqa-f16-half-split": lambda: emulated_rope_qk(mx.float16, "half-split", (4, 2)),
    "rope_qk-mqa-f32-interleaved": lambda: emulated_rope_qk(mx.float32, "interleaved", (8, 1)),
    "rope_kv_block-4bit-g32-f16-half-split": lambda: emulated_kv_block(mx.float16, "half-split", 4, 32),
    "rope_kv_block-8bit-g64-f32-interleaved-2d": lambda: emulated_kv_block(
        mx.float32, "interleaved", 8, 64, two_d=True
    ),
    "rope_kv_block-8bit-g32-f32-interleaved": lambda: emulated_kv_block(mx.float32, "interleaved", 8, 32),
    "rope_kv_block-4bit-g64-f16-half-split-2d": lambda: emulated_kv_block(mx.float16, "half-split", 4, 64, two_d=True),
    "rope_kv_block-unrotated-4bit-g64-f16": lambda: emulated_quantize_blocks(mx.float16, 4, 64),
    "rope_kv_block-unrotated-8bit-g32-f32": lambda: emulated_quantize_blocks(mx.float32, 8, 32),
}


@contextmanager
def cuda_kernels(launch):
    """mlxfam.kernels.rope as on a CUDA GPU, its kernels built by `launch`: each call of a kernel
    object is `launch(section, input_names, output_names, **arguments)`, with the CUDA section
    `_kernel` would hand mx.fast.cuda_kernel and the arguments `_launch` passes the kernel object
    (inputs, template, grid, threadgroup, output_shapes, output_dtypes)."""

    def kernel(kind, sources, name, body, input_names, output_names):
        assert kind == "cuda" and name == f"mlxfam_{body}"
        return lambda **arguments: launch(body, input_names, output_names, **arguments)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mlxfam.kernels.gpu_backend", lambda: "cuda")
        patch.setattr(kernels_rope, "_kernel", kernel)
        yield


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """Every instantiation the EMULATED_CASES launch, as the launchers request them, compiled once for the CPU."""
    if GXX is None:
        pytest.skip("g++ is not installed")
    cuda, functions = sections("cuda", *kv_write.SOURCES), []

    def record(body, input_names, output_names, *, inputs, template, output_shapes, output_dtypes, **_):
        inputs, outputs = zip(input_names, [x.dtype for x in inputs]), zip(output_names, output_dtypes)
        functions.append(emulated_function(body, cuda[body], list(inputs), list(outputs), template))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]

    with cuda_kernels(record):
        for build in EMULATED_CASES.values():
            build()[0]()
    return Emulation(cuda["header"], functions, tmp_path_factory.mktemp("rope_emulation"))


@pytest.mark.parametrize("case", EMULATED_CASES)
def test_cuda_kernel_emulated_on_the_cpu(emulation, case):
    """The CUDA kernels, launched by the launchers (grid, threadgroup, template, the inputs through
    their strides) on tests/kernel_compile.py's CPU emulation, against the numpy oracle. The packed
    cache write follows MLX's GPU quantize rule, so it is held to a step of the rotation (not to the
    CPU's mx.quantize)."""
    launches = []
    launch, check = EMULATED_CASES[case]()
    with cuda_kernels(emulated_launch(emulation, launches)):
        check(launch())
    assert launches == [case.split("-")[0]]  # one launch, of the kernel the case is named after


def emulated_launch(emulation, launches: list):
    """A `cuda_kernels` launch that runs the kernel on the emulation and records its name in `launches`."""

    def run(body, input_names, output_names, *, inputs, **arguments):
        launches.append(body)
        return emulation.call(body, inputs=[np.array(x) for x in inputs], **arguments)

    return run


def test_quantizing_cache_writes_through_the_kernel(emulation):
    """On a CUDA GPU a quantizing cache packs each full block with the cache-write kernel (here under
    the emulation): a prefill of a block and a half, then decode steps up to the second block's end,
    launch it once per packing step, and what the cache holds decodes to the keys and values."""
    k, k64, v, v64 = kv_block_inputs((1, 2, 128, 64), mx.float16, rotary_dims=32)
    cache, launches = KVCache(bits=4, group_size=64), []
    with cuda_kernels(emulated_launch(emulation, launches)):
        cache.update_and_fetch(k[:, :, :96], v[:, :, :96])
        for t in range(96, 128):
            cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert launches == ["rope_kv_block"] * 2
    keys, values = cache.held
    assert keys.tail.shape[2] == values.tail.shape[2] == 0
    assert_kv_block(keys.arrays[:3], values.arrays[:3], k64, v64, 4, 64, mx.float16)
