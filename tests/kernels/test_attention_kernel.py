"""The attention reference and kernels against a naive float64 numpy attention.

The oracle reads packed caches with its own decoder of the layout (numpy bit unpacking of the
words, scales and biases as stored), not mx.dequantize, and repeats kv heads over their query heads
the naive way. Each case runs the reference, and the kernel where MLX computes on a Metal or CUDA
device (skipped, with the reason, elsewhere). Tolerances, by the dtype the inputs are rounded to
before the oracle sees them: float32 1e-4, float16 4e-3, bfloat16 3e-2 (absolute, on outputs of
magnitude about 1), covering the half-precision rounding of q * scale, of the scores (the
reference's half-precision matmuls) and of the output.
"""

from __future__ import annotations

import re
from functools import partial
from itertools import product

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
from mlxfam.kernels import FLOAT_DTYPES, backend, sections
from mlxfam.kernels import attention as kernels_attention
from mlxfam.kernels.attention import (
    HEAD_DIMS,
    MAX_ROW_BLOCKS,
    attention,
    kernel_unsupported,
    max_rows,
)

from mlxfam.attention import attend
from mlxfam.errors import MlxfamError
from mlxfam.kv_layout import QuantizedKV

TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}
PLAIN = None
CACHES = [PLAIN, (4, 32), (4, 64), (8, 32), (8, 64)]  # plain, or (bits, group size)


def cache_id(cache) -> str:
    return "plain" if cache is PLAIN else f"{cache[0]}bit-g{cache[1]}"


# --- the oracle ----------------------------------------------------------------------------------


def as_float64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def unpack(words: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The `count` unsigned `bits`-bit integers along the last axis of uint32 `words`, element i at
    bit (i * bits) % 32 of word (i * bits) // 32."""
    index = np.arange(count)
    return (words[..., index * bits // 32] >> (index * bits % 32).astype(np.uint32)) & np.uint32((1 << bits) - 1)


def decode(x: mx.array | QuantizedKV) -> np.ndarray:
    """Keys or values `(B, Hkv, n_keys, D)` in float64: packed slots (decoded) then the tail."""
    if not isinstance(x, QuantizedKV):
        return as_float64(x)
    scales = np.repeat(as_float64(x.scales), x.group_size, axis=-1)
    biases = np.repeat(as_float64(x.biases), x.group_size, axis=-1)
    words = np.array(x.data)
    if x.per_channel:  # (B, Hkv, D, slots): groups of G slots per channel
        packed = (scales * unpack(words, scales.shape[-1], x.bits) + biases).swapaxes(-1, -2)
    else:  # (B, Hkv, slots, D): groups of G head_dim elements per slot
        packed = scales * unpack(words, scales.shape[-1], x.bits) + biases
    return np.concatenate([packed, as_float64(x.tail)], axis=2)


def naive_attention(q, k, v, *, scale, mask=None, softcap=None) -> np.ndarray:
    queries, keys, values = as_float64(q), decode(k), decode(v)
    heads, length = queries.shape[1:3]
    groups = heads // keys.shape[1]
    keys, values = np.repeat(keys, groups, axis=1), np.repeat(values, groups, axis=1)
    n_keys = keys.shape[2]
    scores = np.einsum("bhld,bhsd->bhls", queries, keys) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    visible = np.ones(scores.shape, dtype=bool)
    if isinstance(mask, str):
        visible &= np.arange(n_keys)[None, :] <= np.arange(n_keys - length, n_keys)[:, None]
    elif mask is not None and mask.dtype == mx.bool_:
        visible &= np.array(mask)
    elif mask is not None:
        scores = scores + as_float64(mask)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ values


# --- operands ------------------------------------------------------------------------------------


def make_queries(batch, heads, length, dim, dtype, seed=0) -> mx.array:
    """(B, Hq, L, D) as the transposed view a model's (B, L, Hq, D) projection gives."""
    return mx.random.normal((batch, length, heads, dim), key=mx.random.key(seed)).astype(dtype).swapaxes(1, 2)


def make_kv(cache, batch, kv_heads, n_keys, dim, dtype, tail=5, seed=1):
    """Keys and values over `n_keys` keys, as views into larger buffers (as a cache hands them
    out): plain arrays, or QuantizedKVs of `n_keys - tail` packed slots (a multiple of the group
    size) and a float tail of `tail` tokens, packed with mx.quantize as the cache layout says."""
    keys_key, values_key, tails_key = mx.random.split(mx.random.key(seed), 3)
    if cache is PLAIN:
        spare = 7  # unused capacity after the used slots
        buffers = [
            mx.random.normal((batch, kv_heads, n_keys + spare, dim), key=key).astype(dtype)
            for key in (keys_key, values_key)
        ]
        return [b[:, :, :n_keys] for b in buffers]
    bits, group_size = cache
    packed = n_keys - tail
    assert packed % group_size == 0 and 0 <= tail < group_size
    capacity = packed + 2 * group_size
    keys = mx.random.normal((batch, kv_heads, capacity, dim), key=keys_key).astype(dtype)
    values = mx.random.normal((batch, kv_heads, capacity, dim), key=values_key).astype(dtype)
    tails = mx.random.normal((2, batch, kv_heads, group_size, dim), key=tails_key).astype(dtype)
    k_data, k_scales, k_biases = mx.quantize(keys.swapaxes(-1, -2), group_size=group_size, bits=bits)
    v_data, v_scales, v_biases = mx.quantize(values, group_size=group_size, bits=bits)
    k = QuantizedKV(
        k_data[..., : packed * bits // 32], k_scales[..., : packed // group_size], k_biases[..., : packed // group_size],
        tails[0][:, :, :tail], group_size, bits, True,
    )  # fmt: skip
    v = QuantizedKV(
        v_data[:, :, :packed],
        v_scales[:, :, :packed],
        v_biases[:, :, :packed],
        tails[1][:, :, :tail],
        group_size,
        bits,
        False,
    )
    return k, v


def n_keys_for(cache, packed_slots=320, tail=5) -> int:
    """About `packed_slots` packed slots (a whole number of groups) and `tail` more keys: over 256
    keys, so a kernel warp (64 keys a step, 4 warps) runs more than one step."""
    group_size = 1 if cache is PLAIN else cache[1]
    return -(-packed_slots // group_size) * group_size + tail


# --- the implementations under test ------------------------------------------------------------


@pytest.fixture(params=["reference", "kernel"])
def implementation(request):
    if request.param == "kernel" and backend() is None:
        pytest.skip(f"no Metal or CUDA device: MLX's default device is {mx.default_device().type.name}")
    return request.param


def check(implementation, q, k, v, **keywords):
    """`implementation`: a `choice` of `attention`, or a function taking attention's arguments."""
    if isinstance(implementation, str):
        implementation = partial(attention, choice=implementation)
    got = implementation(q, k, v, **keywords)
    assert got.shape == q.shape and got.dtype == q.dtype
    expected = naive_attention(q, k, v, **keywords)
    np.testing.assert_allclose(as_float64(got), expected, rtol=0, atol=TOLERANCE[q.dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "dim,cache",
    # A packed cache needs its group size to divide head_dim (values are grouped along it).
    [(dim, cache) for dim in HEAD_DIMS for cache in CACHES if cache is PLAIN or dim % cache[1] == 0],
    ids=lambda x: cache_id(x) if isinstance(x, tuple) or x is PLAIN else str(x),
)
def test_head_dims_dtypes_and_caches(implementation, dim, dtype, cache):
    q = make_queries(1, 4, 1, dim, dtype)
    k, v = make_kv(cache, 1, 2, n_keys_for(cache), dim, dtype)
    check(implementation, q, k, v, scale=dim**-0.5)


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("cache", [PLAIN, (4, 32), (8, 64)], ids=cache_id)
@pytest.mark.parametrize(
    "heads,kv_heads",
    [(4, 4), (4, 2), (8, 2), (16, 2), (8, 1), (32, 1)],
    ids=["mha", "gqa2", "gqa4", "gqa8", "mqa", "mqa32"],
)
def test_gqa_ratios_and_chunks(implementation, heads, kv_heads, cache, length):
    if implementation == "kernel" and heads // kv_heads * length > MAX_ROW_BLOCKS * max_rows(64):
        pytest.skip("more rows than the kernel's blocks of rows serve (kernel_unsupported says so)")
    q = make_queries(2, heads, length, 64, mx.float32)
    k, v = make_kv(cache, 2, kv_heads, n_keys_for(cache), 64, mx.float32)
    check(implementation, q, k, v, scale=0.125, mask="causal")


@pytest.mark.parametrize("packed_groups,tail", [(p, t) for p in (0, 1, 3) for t in (0, 1, "G-1") if p or t])
@pytest.mark.parametrize("cache", CACHES[1:], ids=cache_id)
def test_packed_slots_and_tails(implementation, cache, packed_groups, tail):
    tail = cache[1] - 1 if tail == "G-1" else tail
    q = make_queries(1, 4, 3, 64, mx.float16)
    k, v = make_kv(cache, 1, 2, packed_groups * cache[1] + tail, 64, mx.float16, tail=tail)
    check(implementation, q, k, v, scale=0.125)


def bool_mask(shape, seed=2) -> mx.array:
    visible = mx.random.uniform(shape=shape, key=mx.random.key(seed)) < 0.7
    return visible | (mx.arange(shape[-1]) == 0)  # every query sees a key


def additive_mask(shape, seed=3) -> mx.array:
    biases = mx.random.uniform(-2.0, 0.0, shape=shape, key=mx.random.key(seed))
    return mx.where(bool_mask(shape, seed), biases, -mx.inf)


MASKS = {
    "none": lambda length, n_keys: None,
    "causal": lambda length, n_keys: "causal",
    "bool-per-head": lambda length, n_keys: bool_mask((2, 4, length, n_keys)),
    "bool-shared": lambda length, n_keys: bool_mask((length, n_keys)),
    "additive-per-row": lambda length, n_keys: additive_mask((2, 1, length, n_keys)),
    "additive-float16": lambda length, n_keys: additive_mask((4, length, n_keys)).astype(mx.float16),
}


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("cache", [PLAIN, (8, 32)], ids=cache_id)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masks(implementation, mask_kind, cache, length):
    n_keys = n_keys_for(cache)
    q = make_queries(2, 4, length, 64, mx.float32)
    k, v = make_kv(cache, 2, 2, n_keys, 64, mx.float32)
    check(implementation, q, k, v, scale=0.125, mask=MASKS[mask_kind](length, n_keys))


def every_mask_case(cache, dim, dtype, length=2):
    """Softcap and an additive per-head mask (ALiBi-like biases, -inf where hidden) at once."""
    n_keys = n_keys_for(cache)
    keywords = dict(scale=dim**-0.5, softcap=2.0, mask=additive_mask((1, 4, length, n_keys), seed=5))
    return make_queries(1, 4, length, dim, dtype) * 3, *make_kv(cache, 1, 2, n_keys, dim, dtype), keywords


@pytest.mark.parametrize("mask_kind", ["none", "causal", "additive-per-row"])
@pytest.mark.parametrize("cache", [PLAIN, (8, 64)], ids=cache_id)
def test_softcap(implementation, cache, mask_kind):
    n_keys = n_keys_for(cache)
    q = make_queries(2, 4, 2, 128, mx.float32) * 4  # large scores, so the cap matters
    k, v = make_kv(cache, 2, 2, n_keys, 128, mx.float32)
    check(implementation, q, k, v, scale=128**-0.5, softcap=2.0, mask=MASKS[mask_kind](2, n_keys))


def test_every_mask_at_once(implementation):
    q, k, v, keywords = every_mask_case((4, 32), 96, mx.float16, length=4)
    check(implementation, q, k, v, **keywords)


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("cache", [PLAIN, (4, 64), (8, 32)], ids=cache_id)
def test_long_context(implementation, cache, length):
    """5000 keys: the kernel splits them (about one split per SPLIT_KEYS) and merges the splits."""
    n_keys = 5000 if cache is PLAIN else 5000 // cache[1] * cache[1] + 7
    q = make_queries(1, 8, length, 64, mx.float16)
    k, v = make_kv(cache, 1, 2, n_keys, 64, mx.float16, tail=0 if cache is PLAIN else 7)
    check(implementation, q, k, v, scale=0.125, mask="causal")


# --- the CUDA kernel, run on the CPU --------------------------------------------------------------

# Cases for the CUDA kernel under tests/kernel_compile.py's CPU emulation, together covering lanes
# that idle (D=80, 96), every head-dim class of the lane layout, plain/4-bit/8-bit caches, tails
# alone, all masks, GQA/MQA, query chunks, the split into several blocks merged by the reduce, and
# rows in several blocks (a decode of 16 query heads per kv head; chunks with every mask, and split).
EMULATED_CASES = {
    "plain-f32-d80-gqa4": lambda: (
        make_queries(1, 8, 1, 80, mx.float32), *make_kv(PLAIN, 1, 2, n_keys_for(PLAIN), 80, mx.float32), dict(scale=80**-0.5),
    ),
    "4bit-g32-f16-d128-causal-chunk": lambda: (
        make_queries(1, 4, 3, 128, mx.float16), *make_kv((4, 32), 1, 2, n_keys_for((4, 32)), 128, mx.float16),
        dict(scale=128**-0.5, mask="causal"),
    ),
    "8bit-g64-f32-d256-every-mask": lambda: every_mask_case((8, 64), 256, mx.float32),
    "8bit-g32-f16-d64-tail-only": lambda: (
        make_queries(1, 4, 2, 64, mx.float16), *make_kv((8, 32), 1, 1, 31, 64, mx.float16, tail=31),
        dict(scale=0.125, mask=bool_mask((2, 31))),
    ),
    "plain-f16-d96-mqa-bool": lambda: (
        make_queries(2, 4, 2, 96, mx.float16), *make_kv(PLAIN, 2, 1, n_keys_for(PLAIN), 96, mx.float16),
        dict(scale=96**-0.5, mask=bool_mask((2, 4, 2, n_keys_for(PLAIN)))),
    ),
    "4bit-g64-f16-d64-splits": lambda: (
        make_queries(1, 8, 2, 64, mx.float16), *make_kv((4, 64), 1, 2, 17 * 64 + 7, 64, mx.float16, tail=7),
        dict(scale=0.125, mask="causal"),
    ),
    "plain-f16-d128-gqa16-row-blocks": lambda: (
        make_queries(1, 32, 1, 128, mx.float16), *make_kv(PLAIN, 1, 2, n_keys_for(PLAIN), 128, mx.float16),
        dict(scale=128**-0.5),
    ),
    "8bit-g64-f16-d128-every-mask-row-blocks": lambda: every_mask_case((8, 64), 128, mx.float16, length=5),
    "4bit-g32-f32-d128-row-blocks-splits": lambda: (
        make_queries(1, 8, 3, 128, mx.float32), *make_kv((4, 32), 1, 2, 40 * 32 + 5, 128, mx.float32, tail=5),
        dict(scale=128**-0.5, mask="causal"),
    ),
}  # fmt: skip


def kernel_call(q, k, v, keywords):
    mask = keywords.get("mask")
    shape = kernels_attention._check(q, k, v, mask)
    assert kernels_attention._unsupported(shape, q, k, v) is None
    return kernels_attention._partial_call(shape, q, k, v, keywords["scale"], keywords.get("softcap"), mask)


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The partial and reduce kernels of every EMULATED_CASES call, compiled for the CPU."""
    if GXX is None:
        pytest.skip("g++ is not installed")
    cuda = sections("cuda", "attention")
    functions = []
    for build in EMULATED_CASES.values():
        q, k, v, keywords = build()
        call = kernel_call(q, k, v, keywords)
        inputs = list(zip(kernels_attention._PARTIAL_INPUTS, [x.dtype for x in call.inputs]))
        outputs = [("out", q.dtype), ("part_out", mx.float32), ("part_stats", mx.float32)]
        partials = [("part_out", mx.float32), ("part_stats", mx.float32)]
        reduce_template = kernels_attention._reduce_template(q.dtype, call.shape.dim)
        functions += [
            emulated_function("attention_partial", cuda["attention_partial"], inputs, outputs, call.template),
            emulated_function(
                "attention_reduce", cuda["attention_reduce"], partials, [("out", q.dtype)], reduce_template
            ),
        ]
    return Emulation(cuda["header"], functions, tmp_path_factory.mktemp("emulation"))


def strided_view(x: np.ndarray) -> np.ndarray:
    """x's values in a view that is not contiguous: 4-d arrays inside a buffer longer on axis 2."""
    if x.ndim != 4:
        return x
    buffer = np.zeros((*x.shape[:2], x.shape[2] + 3, x.shape[3]), x.dtype)
    buffer[:, :, : x.shape[2]] = x
    return buffer[:, :, : x.shape[2]]


def emulated_launch(emulation, q, k, v, **keywords) -> mx.array:
    """`_launch` itself (grids, threadgroups, output shapes, the reduce after a split), its partial
    and reduce kernels run on the emulation; the partial kernel is given the cache operands as views
    into longer buffers and the queries as the projection's transposed view."""
    call = kernel_call(q, k, v, keywords)

    def kernel(name: str):
        def run(*, inputs, **arguments):
            arrays = [np.array(x) for x in inputs]
            if name == "attention_partial":
                arrays = [strided_view(x) for x in arrays]
                arrays[0] = np.array(inputs[0].swapaxes(1, 2)).swapaxes(1, 2)
            return emulation.call(name, inputs=arrays, **arguments)

        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kernels_attention, "_kernels", lambda kind: (kernel("attention_partial"), kernel("attention_reduce"))
        )
        return kernels_attention._launch("cuda", call)


@pytest.mark.parametrize("case", EMULATED_CASES)
def test_cuda_kernel_emulated_on_the_cpu(emulation, case):
    q, k, v, keywords = EMULATED_CASES[case]()
    check(lambda *args, **kw: emulated_launch(emulation, *args, **kw), q, k, v, **keywords)


# --- dispatch --------------------------------------------------------------------------------------


def small_call(dim=64, heads=4, kv_heads=2, dtype=mx.float32):
    q = make_queries(1, heads, 1, dim, dtype)
    k, v = make_kv(PLAIN, 1, kv_heads, 40, dim, dtype)
    return q, k, v


def test_reference_is_used_without_a_gpu(monkeypatch):
    monkeypatch.delenv("MLXFAM_KERNELS", raising=False)
    if backend() is not None:
        pytest.skip(f"MLX computes on a {backend()} device here")
    q, k, v = small_call()
    np.testing.assert_allclose(
        as_float64(attention(q, k, v, scale=0.125)), naive_attention(q, k, v, scale=0.125), atol=1e-4
    )


@pytest.fixture
def launches(monkeypatch):
    """Pretend MLX computes on a CUDA device; record the kernel launches instead of running them."""
    calls = []
    monkeypatch.delenv("MLXFAM_KERNELS", raising=False)
    monkeypatch.setattr("mlxfam.kernels.gpu_backend", lambda: "cuda")
    monkeypatch.setattr(kernels_attention, "_launch", lambda kind, call: calls.append(kind) or call.inputs[0])
    return calls


def test_dispatch_runs_the_kernel_where_it_can(launches, monkeypatch):
    q, k, v = small_call()
    attention(q, k, v, scale=0.125)
    assert launches == ["cuda"]
    attention(*small_call(dim=72), scale=0.125)  # unsupported: the reference runs
    attention(q, k, v, scale=0.125, choice="reference")
    monkeypatch.setenv("MLXFAM_KERNELS", "reference")
    attention(q, k, v, scale=0.125)
    assert launches == ["cuda"]


def test_the_models_seam_takes_the_kernel_where_it_can(launches):
    """mlxfam.attention.attend, which every model calls: the kernel where it takes the call, else its
    own fallback (here mx.fast's attention, for a head_dim the kernel is not built for)."""
    attend(*small_call(), scale=0.125)
    assert launches == ["cuda"]
    q, k, v = small_call(dim=72)
    np.testing.assert_allclose(
        as_float64(attend(q, k, v, scale=0.125)), naive_attention(q, k, v, scale=0.125), atol=1e-4
    )
    assert launches == ["cuda"]


def test_forcing_kernels_without_a_gpu_is_an_error(monkeypatch):
    if backend() is not None:
        pytest.skip(f"MLX computes on a {backend()} device here")
    q, k, v = small_call()
    monkeypatch.setenv("MLXFAM_KERNELS", "kernel")
    with pytest.raises(MlxfamError, match="MLXFAM_KERNELS=kernel"):
        attention(q, k, v, scale=0.125)
    monkeypatch.delenv("MLXFAM_KERNELS")
    with pytest.raises(MlxfamError, match="neither the Metal nor the CUDA kernels run"):
        attention(q, k, v, scale=0.125, choice="kernel")


def test_a_bad_choice_is_an_error(monkeypatch):
    q, k, v = small_call()
    monkeypatch.setenv("MLXFAM_KERNELS", "fast")
    with pytest.raises(MlxfamError, match="MLXFAM_KERNELS='fast'"):
        attention(q, k, v, scale=0.125)
    with pytest.raises(MlxfamError, match="'gpu'"):
        attention(q, k, v, scale=0.125, choice="gpu")


def test_kernel_unsupported_names_the_reason():
    assert kernel_unsupported(*small_call()) is None
    assert "head_dim 72" in kernel_unsupported(*small_call(dim=72))
    assert kernel_unsupported(*small_call(dim=128, heads=32, kv_heads=1)) is None  # 4 blocks of 8 rows
    assert kernel_unsupported(*small_call(dim=128, heads=64, kv_heads=2)) is None  # the most: 32 rows
    reason = kernel_unsupported(*small_call(dim=128, heads=66, kv_heads=2))
    assert "33 query heads per kv head x 1 queries = 33 rows, above the kernel's 32 for head_dim 128" in reason
    q, k, v = small_call()
    assert "the keys are mlx.core.float32 but the queries mlx.core.float16" in kernel_unsupported(
        q.astype(mx.float16), k, v
    )
    kq, vq = make_kv((8, 32), 1, 2, 69, 64, mx.float32)
    _, plain_v = make_kv(PLAIN, 1, 2, 69, 64, mx.float32)
    assert "one of keys and values is quantized" in kernel_unsupported(q, kq, plain_v)
    assert kernel_unsupported(q, kq, vq) is None


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(mask="sliding"), "only mask named by a string is 'causal'"),
        (dict(mask=mx.ones((3, 40), dtype=mx.bool_)), "does not broadcast"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    q, k, v = small_call()
    for implementation in (partial(attention, choice="reference"), kernel_unsupported):
        with pytest.raises(MlxfamError, match=re.escape(message)):
            implementation(q, k, v, **{"scale": 0.125, **change})


def test_bad_operands_are_clear_errors():
    q, k, v = small_call(heads=3, kv_heads=2)
    with pytest.raises(MlxfamError, match="3 query heads are not a multiple of 2 kv heads"):
        attention(q, k, v, scale=0.125, choice="reference")
    q, _, _ = small_call()
    kq, _ = make_kv((4, 32), 1, 2, 69, 64, mx.float32)
    with pytest.raises(MlxfamError, match=re.escape("values: a QuantizedKV packed per token (values) was expected")):
        attention(q, kq, kq, scale=0.125, choice="reference")


# --- the sources -----------------------------------------------------------------------------------


def test_metal_and_cuda_kernels_are_one_text():
    """One text after each platform's prelude (`assert_one_algorithm`), so what is checked of the
    CUDA kernel (compiled, run) holds of the Metal kernel's algorithm."""
    assert list(sections("cuda", "attention")) == ["header", "attention_partial", "attention_reduce"]
    assert_one_algorithm("attention")


def launcher_requests():
    """Every (template, input dtypes) the launcher can ask the partial kernel for, and the reduce
    kernel's templates: each dtype and head_dim, each row count up to the kernel's bound, plain and
    packed caches."""
    partial, reduce = [], []
    for dtype, dim in product(FLOAT_DTYPES, HEAD_DIMS):
        rows = 1
        while rows <= max_rows(dim):
            q = mx.zeros((1, rows, 1, dim), dtype=dtype)
            for cache in (PLAIN, (4, 32)) if dim % 32 == 0 else (PLAIN,):
                k, v = make_kv(cache, 1, 1, n_keys_for(cache, packed_slots=32), dim, dtype)
                shape = kernels_attention._check(q, k, v, None)
                call = kernels_attention._partial_call(shape, q, k, v, 1.0, None, None)
                partial.append((call.template, [x.dtype for x in call.inputs], dtype))
            rows *= 2
        reduce.append(kernels_attention._reduce_template(dtype, dim))
    return partial, reduce


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_every_instantiation(tmp_path):
    cuda = sections("cuda", "attention")
    partial, reduce = launcher_requests()
    functions = [
        kernel_function(
            "mlxfam_attention_partial", cuda["attention_partial"],
            list(zip(kernels_attention._PARTIAL_INPUTS, dtypes)),
            [("out", dtype), ("part_out", mx.float32), ("part_stats", mx.float32)], template,
        )
        for template, dtypes, dtype in partial
    ] + [
        kernel_function("mlxfam_attention_reduce", cuda["attention_reduce"],
                        [("part_out", mx.float32), ("part_stats", mx.float32)], [("out", template[0][1])], template)
        for template in reduce
    ]  # fmt: skip
    nvcc_compile(cuda_source(cuda["header"], functions), tmp_path, optimize=False)
