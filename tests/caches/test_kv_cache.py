"""The KV cache family: quantized (4/8-bit, packed), rotating, both together, their exact sizes, and
prompt caches saved to disk.

References: a float64 numpy attention over keys and values decoded from the packed layout that
mlxfam.cache documents (not with MLX); for the rotating cache, the full cache on a sliding-window
model; for 8-bit keys and values on the real SmolLM2-135M, the fp16 cache's greedy tokens and
transformers' (tests/data/golden-real).
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlxfam_apps.chat import ChatSession

import mlxfam
from mlxfam import attention
from mlxfam.attention import attend
from mlxfam.cache import KVCache, RotatingKVCache
from mlxfam.kv_layout import QuantizedKV
from mlxfam.models import family_for
from mlxfam.quantize import dequantize_model

DATA = Path(__file__).parents[1] / "data"
GOLDEN = DATA / "golden"
REAL = DATA / "golden-real" / "smollm2-135m"
DIM = 64  # head_dim of the synthetic tensors and of the tiny model below


def as_float64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def unpack(x: QuantizedKV) -> np.ndarray:
    """Every slot of packed keys/values (packed, then tail) as `(B, kv_heads, slots, head_dim)`,
    decoded as mlxfam.cache's docstring says: along the last axis of `data` (channels' slots for
    keys, a slot's channels for values), element i is scale * u + bias, u the `bits` bits at offset
    (i * bits) % 32 of word i * bits // 32, with scale and bias those of group i // group_size."""
    words = np.array(x.data)
    shifts = (np.arange(32 // x.bits) * x.bits).astype(np.uint32)
    u = (words[..., None] >> shifts) & np.uint32((1 << x.bits) - 1)
    u = u.reshape(*words.shape[:-1], words.shape[-1] * 32 // x.bits).astype(np.float64)
    scales = np.repeat(as_float64(x.scales), x.group_size, axis=-1)
    biases = np.repeat(as_float64(x.biases), x.group_size, axis=-1)
    packed = scales * u + biases
    if x.per_channel:
        packed = packed.swapaxes(-1, -2)
    return np.concatenate([packed, as_float64(x.tail)], axis=2)


def stored(x: np.ndarray, group_size: int, bits: int, packed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values `x` `(B, kv_heads, slots, head_dim)` as a quantizing cache holds them, decoded:
    whole blocks of `group_size` tokens quantized by MLX (keys per channel, values per token), then
    the rest as they came. `packed`: the blocks cover only the first `packed` tokens (what a step
    attends: the blocks stored before it; its own tokens are read in float)."""
    whole = x.shape[2] // group_size * group_size if packed is None else packed
    block = mx.array(x[:, :, :whole], mx.float32)
    key_parts = mx.quantize(block.swapaxes(-1, -2), group_size=group_size, bits=bits)
    value_parts = mx.quantize(block, group_size=group_size, bits=bits)
    tail = mx.array(x[:, :, whole:], mx.float32)
    return (
        unpack(QuantizedKV(*key_parts, tail, group_size, bits, True)),
        unpack(QuantizedKV(*value_parts, tail, group_size, bits, False)),
    )


def reference_attention(q, k, v, scale, visible=None, bias=None, softcap=None) -> np.ndarray:
    """softmax over keys of (softcapped) q.k * scale, plus `bias`, hidden where not `visible`; GQA
    by repeating each kv head for its group of query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = scale * q @ k.swapaxes(-1, -2)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def quantized_bytes_per_slot(head_dim: int, bits: int, group_size: int, itemsize: int) -> int:
    """Per head and slot: head_dim * bits packed bits, plus one scale and one bias per group."""
    return head_dim * bits // 8 + 2 * (head_dim // group_size) * itemsize


def test_documented_layout_decodes_like_mlx():
    """A cache holding 140 tokens: whole blocks packed as documented (keys per channel over each block's
    slots, values per slot), the rest in the float tail; decoded, they are MLX's own dequantization."""
    x = mx.random.normal((1, 2, 140, DIM), key=mx.random.key(0))
    for bits, group_size in [(4, 32), (4, 64), (8, 32), (8, 64)]:
        cache = KVCache(bits=bits, group_size=group_size)
        cache.update_and_fetch(x[:, :, :100], x[:, :, :100] * 2)
        cache.update_and_fetch(x[:, :, 100:], x[:, :, 100:] * 2)
        keys, values = cache.held
        whole = 140 // group_size * group_size
        assert keys.data.dtype == values.data.dtype == mx.uint32 and keys.packed_slots == values.packed_slots == whole
        assert keys.data.shape == (1, 2, DIM, whole * bits // 32) and values.data.shape == (
            1,
            2,
            whole,
            DIM * bits // 32,
        )
        assert keys.scales.shape == keys.biases.shape == (1, 2, DIM, whole // group_size)
        assert values.scales.shape == values.biases.shape == (1, 2, whole, DIM // group_size)
        assert keys.tail.shape == values.tail.shape == (1, 2, 140 - whole, DIM)
        packed_keys = mx.dequantize(*keys.arrays[:3], group_size, bits).swapaxes(-1, -2)
        packed_values = mx.dequantize(*values.arrays[:3], group_size, bits)
        np.testing.assert_allclose(unpack(keys), np.concatenate([packed_keys, x[:, :, whole:]], axis=2), atol=1e-6)
        np.testing.assert_allclose(
            unpack(values), np.concatenate([packed_values, 2 * x[:, :, whole:]], axis=2), atol=1e-6
        )


PRIOR, LENGTH = 66, 7  # tokens already cached (whole blocks and a tail), then queries of this step


@pytest.mark.parametrize("query_chunk", [3, None])
@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 32)])
@pytest.mark.parametrize("mask_kind", ["causal", "decode", "window", "alibi", "softcap"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 1)])
def test_quantized_attention_equals_numpy_reference(
    monkeypatch, heads, kv_heads, mask_kind, bits, group_size, query_chunk
):
    """`query_chunk` 3: the score budget leaves room for 3 queries a chunk (7 queries: 3 + 3 + 1)."""
    length = 1 if mask_kind == "decode" else LENGTH
    if query_chunk is not None:
        monkeypatch.setattr(attention, "CHUNK_SCORES", query_chunk * heads * (PRIOR + length))
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q = rng.standard_normal((1, heads, length, DIM))
    k = rng.standard_normal((1, kv_heads, PRIOR + length, DIM))
    k[..., 5] *= 12  # an outlier channel, as real models' keys have
    v = rng.standard_normal((1, kv_heads, PRIOR + length, DIM))
    cache = KVCache(bits=bits, group_size=group_size)
    cache.update_and_fetch(mx.array(k[:, :, :PRIOR], mx.float32), mx.array(v[:, :, :PRIOR], mx.float32))
    keys, values = cache.update_and_fetch(mx.array(k[:, :, PRIOR:], mx.float32), mx.array(v[:, :, PRIOR:], mx.float32))
    assert isinstance(keys, QuantizedKV) and isinstance(values, QuantizedKV)
    assert keys.packed_slots > 0 and keys.tail.shape[2] > 0

    query_pos, key_pos = np.arange(PRIOR, PRIOR + length)[:, None], np.arange(PRIOR + length)[None]
    causal = key_pos <= query_pos
    visible, bias, softcap, mask = causal, None, None, "causal"
    if mask_kind == "decode":
        mask = None
    elif mask_kind == "window":
        visible = causal & (key_pos > query_pos - 4)
        mask = mx.array(visible)
    elif mask_kind == "alibi":  # per-head linear biases, -inf on future keys
        slopes = 2.0 ** -np.arange(1, heads + 1)
        bias = np.where(causal, -slopes[:, None, None] * (query_pos - key_pos), -np.inf)[None]
        visible, mask = None, mx.array(bias, mx.float32)
    elif mask_kind == "softcap":
        softcap = 0.7

    out = attend(mx.array(q, mx.float32), keys, values, scale=DIM**-0.5, mask=mask, softcap=softcap)
    packed = PRIOR // group_size * group_size  # the blocks stored before this step
    k_ref, v_ref = stored(k, group_size, bits, packed)[0], stored(v, group_size, bits, packed)[1]
    np.testing.assert_allclose(unpack(keys), k_ref, atol=1e-6)
    expected = reference_attention(q, k_ref, v_ref, DIM**-0.5, visible, bias, softcap)
    np.testing.assert_allclose(np.array(out), expected, atol=1e-5, rtol=1e-5)


def test_float16_quantized_attention_is_close_to_the_reference():
    """Four float16 queries over a packed block of 64 and the float tokens after it."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, h, 70, DIM)) for h in (8, 2, 2))
    k16, v16 = mx.array(k, mx.float16), mx.array(v, mx.float16)
    cache = KVCache(bits=8, group_size=64)
    cache.update_and_fetch(k16[:, :, :66], v16[:, :, :66])
    keys, values = cache.update_and_fetch(k16[:, :, 66:], v16[:, :, 66:])
    assert keys.scales.dtype == keys.tail.dtype == mx.float16 and keys.packed_slots == 64
    q16 = mx.array(q[:, :, 66:], mx.float16)
    out = attend(q16, keys, values, scale=DIM**-0.5, mask="causal")
    assert out.dtype == mx.float16
    visible = np.arange(70)[None] <= np.arange(66, 70)[:, None]
    k_ref, v_ref = stored(as_float64(k16), 64, 8, 64)[0], stored(as_float64(v16), 64, 8, 64)[1]
    # float16 queries and output carry ~3 significant digits.
    np.testing.assert_allclose(
        as_float64(out), reference_attention(as_float64(q16), k_ref, v_ref, DIM**-0.5, visible), atol=5e-3
    )


def attention_peak(compute) -> int:
    """Bytes allocated at the peak of `compute()`'s evaluation, above what was held before."""
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(compute())
    return mx.get_peak_memory() - held


def test_quantized_prefill_attention_peaks_below_float16_attention():
    """A 512-query prefill step over 4096 keys: float16 attention's scores alone are 64 MiB; the
    quantized path's chunks keep its peak below that whole computation's."""
    heads, kv_heads, queries, keys = 16, 8, 512, 4096
    q = mx.random.normal((1, heads, queries, DIM), key=mx.random.key(0)).astype(mx.float16)
    k, v = (mx.random.normal((1, kv_heads, keys, DIM), key=mx.random.key(i)).astype(mx.float16) for i in (1, 2))
    cache = KVCache(bits=4)
    cache.update_and_fetch(k, v)
    packed_k, packed_v = cache.held
    mx.eval(q, k, v, packed_k.arrays, packed_v.arrays)
    float16 = attention_peak(lambda: attend(q, k, v, scale=DIM**-0.5, mask="causal"))
    quantized = attention_peak(lambda: attend(q, packed_k, packed_v, scale=DIM**-0.5, mask="causal"))
    assert float16 >= heads * queries * keys * 2
    assert quantized < float16 / 2


def test_a_family_reading_quantized_keys_as_arrays_gets_a_clear_error():
    packed, _ = KVCache(bits=8).update_and_fetch(mx.zeros((1, 1, 70, DIM)), mx.zeros((1, 1, 70, DIM)))
    with pytest.raises(
        mlxfam.MlxfamError,
        match=r"reads its cached keys and values as plain arrays \(\.transpose\).*kv_bits is not supported",
    ):
        packed.transpose(0, 2, 1, 3)
    assert not hasattr(packed, "shape")


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 32)])
def test_quantized_rotating_attention_equals_numpy_reference(bits, group_size, window):
    """Prefill, decode past the bound (blocks overwrite stale ones in place), a multi-token step after
    the wrap and one longer than the cache: every query sees the keep tokens and its latest window,
    each key as the full quantizing cache holds it (its block quantized once full, else float)."""
    max_size, keep, heads, kv_heads = 100, 2, 4, 2
    steps = [70] + [1] * 60 + [9] + [1] * 70 + [150]
    rng = np.random.default_rng(7)
    k, v = (rng.standard_normal((1, kv_heads, sum(steps), DIM)) for _ in range(2))
    cache = RotatingKVCache(max_size, keep, bits=bits, group_size=group_size)
    start = 0
    for length in steps:
        q = rng.standard_normal((1, heads, length, DIM))
        mask, positions = cache.make_mask(length, window), cache.key_positions(length)
        stop = start + length
        keys, values = cache.update_and_fetch(
            mx.array(k[:, :, start:stop], mx.float32), mx.array(v[:, :, start:stop], mx.float32)
        )
        assert len(positions) == keys.slots and len(cache.slot_positions) <= keys.slots
        out = attend(mx.array(q, mx.float32), keys, values, scale=DIM**-0.5, mask=mask)
        query_pos, key_pos = np.arange(start, stop)[:, None], np.arange(stop)[None]
        visible = (key_pos <= query_pos) & ((key_pos < keep) | (key_pos > query_pos - (max_size - keep)))
        if window is not None:
            visible &= key_pos > query_pos - window
        packed = start // group_size * group_size  # the blocks stored before this step
        k_ref, v_ref = (stored(x[:, :, :stop], group_size, bits, packed) for x in (k, v))
        k_ref, v_ref = k_ref[0], v_ref[1]
        expected = reference_attention(q, k_ref, v_ref, DIM**-0.5, visible)
        np.testing.assert_allclose(np.array(out), expected, atol=1e-5, rtol=1e-5)
        start = stop
    blocks = -(-keep // group_size) + -(-(max_size - keep) // group_size) + 1
    tail = sum(steps) % group_size
    assert cache.nbytes == 2 * kv_heads * (
        blocks * group_size * quantized_bytes_per_slot(DIM, bits, group_size, 4) + tail * DIM * 4
    )


def test_nbytes_is_exact_for_every_kind():
    kv_heads, fp16 = 2, 2

    def filled(cache, tokens):
        x = mx.zeros((1, kv_heads, tokens, DIM), mx.float16)
        cache.update_and_fetch(x, x)
        return cache.nbytes

    dense_slot, q8_slot = DIM * fp16, quantized_bytes_per_slot(DIM, 8, 64, fp16)
    q4_slot = quantized_bytes_per_slot(DIM, 4, 32, fp16)
    both = 2 * kv_heads  # keys and values, per kv head
    assert filled(KVCache(), 300) == both * 512 * dense_slot  # two steps of 256 slots
    # 4 blocks of 64 in a buffer of 256 slots, and a float tail of 300 - 256 tokens
    assert filled(KVCache(bits=8), 300) == both * (256 * q8_slot + 44 * dense_slot)
    assert filled(KVCache(bits=4, group_size=32), 10) == both * 10 * dense_slot  # no whole block yet
    assert filled(KVCache(bits=4, group_size=32), 40) == both * (256 * q4_slot + 8 * dense_slot)
    assert filled(RotatingKVCache(16, 4), 40) == both * 16 * dense_slot
    # blocks for keep (1) and the window (1) and one arriving; the first block holds the keep tokens
    assert filled(RotatingKVCache(16, 4, bits=4, group_size=32), 40) == both * (3 * 32 * q4_slot + 8 * dense_slot)
    assert filled(KVCache(bits=8, quantized_kv_start=100), 10) == both * 256 * dense_slot  # not yet quantized
    assert KVCache().nbytes == 0
    # 4-bit keys and values with group 64: 0.28 of float16
    assert quantized_bytes_per_slot(DIM, 4, 64, fp16) / dense_slot <= 0.3


def test_quantization_starts_once_the_cache_holds_quantized_kv_start_tokens():
    x = mx.random.normal((1, 2, 80, DIM), key=mx.random.key(3))
    cache = KVCache(bits=8, group_size=32, quantized_kv_start=40)
    cache.update_and_fetch(x[:, :, :30], x[:, :, :30])
    cache.update_and_fetch(x[:, :, 30:50], x[:, :, 30:50])
    assert not cache.quantized  # it held 30 (< 40) tokens when these came
    cache.update_and_fetch(x[:, :, 50:], x[:, :, 50:])
    keys, values = cache.held
    assert cache.quantized and keys.packed_slots == 64 and keys.tail.shape[2] == 16
    k_ref, v_ref = stored(np.array(x), 32, 8)
    np.testing.assert_allclose(unpack(keys), k_ref, atol=1e-6)
    np.testing.assert_allclose(unpack(values), v_ref, atol=1e-6)


# A Mistral-layout model (sliding window 8, GQA 4/2) with head_dim 64: the golden fixtures have
# head_dim 16, which no allowed group size (32, 64) divides. Random weights, seeded.
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def write_tiny_model(directory: Path, seed: int) -> Path:
    directory.mkdir()
    config = json.loads((GOLDEN / "mistral" / "config.json").read_text()) | {"head_dim": DIM}
    (directory / "config.json").write_text(json.dumps(config))
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (heads * DIM, hidden),
            layer + "self_attn.k_proj.weight": (kv_heads * DIM, hidden),
            layer + "self_attn.v_proj.weight": (kv_heads * DIM, hidden),
            layer + "self_attn.o_proj.weight": (hidden, heads * DIM),
            layer + "mlp.gate_proj.weight": (inter, hidden),
            layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
        }
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1:
            weights[name] = 1 + 0.1 * rng.standard_normal(shape)
        else:
            weights[name] = rng.standard_normal(shape) / (1 if "embed" in name else np.sqrt(shape[1]))
    mx.save_safetensors(str(directory / "model.safetensors"), {k: mx.array(w, mx.float32) for k, w in weights.items()})
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, _ = mlxfam.load(tiny_dir, dtype="float32")
    return model


TINY_IDS = [3, 17, 250, 9, 44, 101, 7, 300, 12, 5, 480, 66]  # 12 prompt tokens, past the window of 8


def run_cached(model, cache, chunk: int, decode_ids) -> np.ndarray:
    """Prompt logits (fed `chunk` tokens at a time), then one row per decode id."""
    ids = mx.array([TINY_IDS], dtype=mx.int32)
    rows = [model(ids[:, i : i + chunk], cache=cache)[0] for i in range(0, ids.shape[1], chunk)]
    rows += [model(mx.array([[t]], dtype=mx.int32), cache=cache)[0] for t in decode_ids]
    return np.array(mx.concatenate(rows, axis=0))


DECODE_IDS = [21, 400, 3, 3, 77, 150, 2, 91, 8, 333]
LONG_DECODE_IDS = [(i * 37 + 11) % 512 for i in range(70)]  # with the prompt, 2 blocks of 32 and a tail


@pytest.mark.parametrize("chunk", [12, 5, 1])
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_rotating_cache_of_the_window_equals_the_full_cache(tiny, kv_bits, chunk):
    """A sliding-window model sees only its last 8 keys, so a rotating cache of 8 gives the full
    cache's logits: exactly (1e-5) with the same kv_bits, since both quantize the same blocks."""
    quantization = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": 32}
    full = run_cached(tiny, tiny.make_cache(**quantization), chunk, LONG_DECODE_IDS)
    rotating_cache = tiny.make_cache(max_kv_size=8, keep=0, **quantization)
    rotating = run_cached(tiny, rotating_cache, chunk, LONG_DECODE_IDS)
    np.testing.assert_allclose(rotating, full, atol=1e-5, rtol=1e-5)
    layer = rotating_cache[0]
    assert layer.offset == len(TINY_IDS) + len(LONG_DECODE_IDS)
    kv_heads, slot = tiny.config.num_kv_heads, DIM * 4
    if kv_bits is None:
        assert layer.nbytes == 2 * kv_heads * 8 * slot
    else:  # a block for the window and one arriving, and the tail
        assert layer.quantized and layer.units >= 1
        bound = 2 * 32 * quantized_bytes_per_slot(DIM, kv_bits, 32, 4) + layer.tail_len * slot
        assert layer.nbytes == 2 * kv_heads * bound


def test_8_bit_keys_and_values_stay_close_to_float(tiny):
    """Tolerance: 8-bit groups round each key/value by at most scale/2 (~0.4% of the group's range);
    on this model (logits std ~1) that moves logits by < 0.05 (observed ~0.02)."""
    dense = run_cached(tiny, tiny.make_cache(), 5, LONG_DECODE_IDS)
    for cache in (
        tiny.make_cache(kv_bits=8, kv_group_size=32),
        tiny.make_cache(kv_bits=8, kv_group_size=32, max_kv_size=8, keep=0),
    ):
        np.testing.assert_allclose(run_cached(tiny, cache, 5, LONG_DECODE_IDS), dense, atol=0.05)


FAMILY_VARIANTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_every_family_runs_on_quantized_and_bounded_caches(variant):
    """Each golden fixture's family (its masks: ALiBi, windows, softcaps, prefixes, logn, ...) with
    head_dim 32 (the fixtures' 16 fits no group size) and random weights: 8-bit keys and values stay
    within 0.1 of the float cache (observed <= 0.035, logits std ~0.6-1), on the full cache and on
    a bounded one that wraps (10 slots, keep 4, 16 tokens). The float cache is the one
    test_golden holds to the original code."""
    hf_config = json.loads((GOLDEN / variant / "config.json").read_text())
    family = family_for(hf_config)
    cfg = family.config(hf_config)
    rope = cfg.rope and dataclasses.replace(cfg.rope, dims=cfg.rope.dims * 32 // cfg.head_dim)
    mx.random.seed(0)
    model = family.model_class(dataclasses.replace(cfg, head_dim=32, rope=rope))
    model.set_dtype(mx.float32)
    ids = mx.array(np.load(GOLDEN / variant / "golden.npz")["input_ids"], dtype=mx.int32)
    chunk = ids.shape[1] if model.whole_prompt_prefill else 5

    def run(**options) -> np.ndarray:
        cache = model.make_cache(**options)
        rows = [model(ids[:, i : i + chunk], cache=cache)[0] for i in range(0, ids.shape[1], chunk)]
        rows += [model(mx.array([[t]], dtype=mx.int32), cache=cache)[0] for t in (5, 9, 11, 3)]
        return np.array(mx.concatenate(rows, axis=0))

    eight_bit = {"kv_bits": 8, "kv_group_size": 32}
    np.testing.assert_allclose(run(**eight_bit), run(), atol=0.1)
    bounded = {"max_kv_size": 10, "keep": 4}
    np.testing.assert_allclose(run(**bounded, **eight_bit), run(**bounded), atol=0.1)


class SilentTokenizer:
    """Just enough tokenizer for stream_generate over raw ids."""

    eos_token_ids = ()

    def detokenizer(self):
        return type("Detokenizer", (), {"add_token": lambda self, t: "", "finalize": lambda self: ""})()


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_generation_past_max_kv_size_keeps_the_cache_bounded(tiny, kv_bits):
    """Float: always its 16 slots. 8-bit (blocks of 32): at most the blocks a query may see plus one
    arriving (here 2, the keep tokens in the first), and a tail of under 32 tokens, however long it runs."""
    options = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": 32}
    cache = tiny.make_cache(max_kv_size=16, **options)
    sizes = []
    for response in mlxfam.stream_generate(  # noqa: B007 (the last response is checked below)
        tiny, SilentTokenizer(), TINY_IDS, max_tokens=150, cache=cache, max_kv_size=16, **options
    ):
        sizes.append(sum(layer.nbytes for layer in cache))
    assert response.generation_tokens == 150 and cache[0].offset >= 12 + 150 - 1
    per_slot = len(cache) * 2 * 2  # layers x (keys, values) x kv heads
    if kv_bits is None:
        assert set(sizes) == {per_slot * 16 * DIM * 4}  # float32 model
    else:
        blocks = 1 + 1 + 1  # keep (4 tokens), window (12), arriving
        assert cache[0].units == blocks
        assert max(sizes) <= per_slot * (blocks * 32 * quantized_bytes_per_slot(DIM, 8, 32, 4) + 31 * DIM * 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kv_bits": 3}, r"kv_bits must be 4 or 8 \(or None for an unquantized cache\), got 3"),
        ({"kv_bits": 4, "kv_group_size": 128}, r"kv_group_size must be 32 or 64, got 128"),
        ({"kv_bits": 8, "quantized_kv_start": -1}, r"quantized_kv_start must be an integer >= 0, got -1"),
        ({"max_kv_size": 4}, r"max_kv_size \(4\) must be larger than keep \(4\)"),
    ],
)
def test_bad_cache_options_are_refused(tiny, options, message):
    with pytest.raises(mlxfam.MlxfamError, match=message):
        tiny.make_cache(**options)
    with pytest.raises(mlxfam.MlxfamError, match=message):
        mlxfam.stream_generate(tiny, SilentTokenizer(), TINY_IDS, **options)


def test_cache_options_are_one_value_or_keywords(tiny):
    with pytest.raises(mlxfam.MlxfamError, match=r"kv_bits must be 4 or 8"):
        mlxfam.CacheOptions(kv_bits=3)
    options = mlxfam.CacheOptions(kv_bits=8, max_kv_size=16)
    assert [c.settings for c in tiny.make_cache(options)] == [
        c.settings for c in tiny.make_cache(kv_bits=8, max_kv_size=16)
    ]
    with pytest.raises(mlxfam.MlxfamError, match=r"cache options given twice: a CacheOptions and keywords kv_bits"):
        tiny.make_cache(options, kv_bits=4)


def test_group_size_must_divide_head_dim():
    model, _ = mlxfam.load(GOLDEN / "llama2", dtype="float32")  # head_dim 16
    with pytest.raises(mlxfam.MlxfamError, match=r"kv_group_size 32 does not divide the model's head_dim 16"):
        model.make_cache(kv_bits=4, kv_group_size=32)


def test_kv_flags_are_checked_before_loading():
    command = [sys.executable, "-m", "mlxfam_apps", "generate", "./no-such-model", "-p", "hi"]
    for flags, message in [
        (["--kv-bits", "3"], "mlxfam: error: kv_bits must be 4 or 8"),
        (["--kv-bits", "4", "--kv-group-size", "48"], "mlxfam: error: kv_group_size must be 32 or 64, got 48"),
    ]:
        result = subprocess.run(command + flags, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr


# Prompt caches: saved here, loaded in a new process, the next token's logits bit for bit the same.
RESUME = """
import json, sys
import mlx.core as mx, numpy as np
import mlxfam
model_dir, cache_file, settings, token, out = sys.argv[1:]
model, _ = mlxfam.load(model_dir, dtype="float32")
cache, metadata = mlxfam.load_prompt_cache(cache_file, model, **json.loads(settings))
np.save(out, np.array(model(mx.array([[int(token)]]), cache=cache)))
print(json.dumps({"metadata": metadata, "family_state": cache[0].family_state, "offset": cache[0].offset}))
"""

CACHE_SETTINGS = [
    {},
    {"kv_bits": 8},
    {"kv_bits": 4, "kv_group_size": 32, "max_kv_size": 8, "keep": 2},
    {"kv_bits": 4, "quantized_kv_start": 13},  # saved unquantized; the next token converts it
    {"max_kv_size": 10},
]


@pytest.mark.parametrize("settings", CACHE_SETTINGS)
def test_prompt_cache_resumes_in_a_new_process(tiny, tiny_dir, tmp_path, settings):
    cache = tiny.make_cache(**settings)
    tiny(mx.array([TINY_IDS], dtype=mx.int32), cache=cache)
    tiny(mx.array([[21]], dtype=mx.int32), cache=cache)  # a decode step: the rotating cache writes a slot in place
    for layer in cache:
        layer.family_state = {"ntk_alpha": 1.5}
    path = tmp_path / "prompt.cache"
    mlxfam.save_prompt_cache(path, cache, tiny, metadata={"turns": ["hi"]})
    here = np.array(tiny(mx.array([[400]], dtype=mx.int32), cache=cache))

    out = tmp_path / "logits.npy"
    result = subprocess.run(
        [sys.executable, "-c", RESUME, str(tiny_dir), str(path), json.dumps(settings), "400", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    resumed = json.loads(result.stdout)
    assert resumed == {"metadata": {"turns": ["hi"]}, "family_state": {"ntk_alpha": 1.5}, "offset": 14}
    np.testing.assert_array_equal(np.load(out), here)


# Per-layer caches: the gemma2 fixture's layers 0 and 2 slide over 8 keys, layer 1 is global; with
# window caches its sliding layers keep only their window (rotating caches of 8 slots).
WINDOW_RESUME = """
import json, sys
import mlx.core as mx, numpy as np
import mlxfam
model_dir, cache_file, settings, token, out = sys.argv[1:]
model, _ = mlxfam.load(model_dir, dtype="float32")
model.window_caches = True
cache, _ = mlxfam.load_prompt_cache(cache_file, model, mlxfam.CacheOptions(**json.loads(settings)))
np.save(out, np.array(model(mx.array([[int(token)]]), cache=cache)))
print(json.dumps([layer.settings for layer in cache]))
"""
SLIDING = {"kind": "RotatingKVCache", "kv_bits": None, "max_kv_size": 8, "keep": 0}
GLOBAL = {"kind": "KVCache", "kv_bits": None}


@pytest.fixture
def window_cached():
    model, _ = mlxfam.load(GOLDEN / "gemma2", dtype="float32")
    model.window_caches = True
    return model


def test_window_caches_keep_the_original_logits(window_cached):
    """transformers' Gemma 2 logits (its hybrid cache also holds a window per sliding layer), with a
    12-token prompt past the window of 8 and four cached decode steps."""
    golden = np.load(GOLDEN / "gemma2" / "golden.npz")
    cache = window_cached.make_cache()
    assert [layer.settings for layer in cache] == [SLIDING, GLOBAL, SLIDING]
    prefill = window_cached(mx.array(golden["input_ids"], dtype=mx.int32), cache=cache)
    steps = [window_cached(mx.array([[int(t)]]), cache=cache)[0, -1] for t in golden["decode_ids"]]
    np.testing.assert_allclose(np.array(prefill), golden["prefill_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(mx.stack(steps)), golden["decode_logits"], atol=1e-4, rtol=1e-4)
    config = window_cached.config  # the sliding layers hold 8 slots of float32 keys and values
    assert cache[0].offset == cache[1].offset == 16
    assert cache[0].nbytes == cache[2].nbytes == 2 * config.num_kv_heads * 8 * config.head_dim * 4


@pytest.mark.parametrize("settings", [{}, {"kv_bits": 8, "kv_group_size": 32}, {"max_kv_size": 12, "keep": 4}])
def test_prompt_cache_of_per_layer_caches_resumes_in_a_new_process(window_cached, tmp_path, settings):
    options = mlxfam.CacheOptions(**settings)
    cache = window_cached.make_cache(options)
    window_cached(mx.array([TINY_IDS], dtype=mx.int32), cache=cache)
    window_cached(mx.array([[21]], dtype=mx.int32), cache=cache)
    path = tmp_path / "prompt.cache"
    mlxfam.save_prompt_cache(path, cache, window_cached)
    here = np.array(window_cached(mx.array([[400]], dtype=mx.int32), cache=cache))

    out = tmp_path / "logits.npy"
    command = [sys.executable, "-c", WINDOW_RESUME, str(GOLDEN / "gemma2"), str(path), json.dumps(settings), "400"]
    result = subprocess.run([*command, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    settings_here = [layer.settings for layer in cache]
    assert settings_here[0] == settings_here[2] != settings_here[1] and settings_here[0]["max_kv_size"] == 8
    assert json.loads(result.stdout) == settings_here
    np.testing.assert_array_equal(np.load(out), here)


def test_prompt_cache_with_another_layer_cache_is_refused(window_cached, tmp_path):
    path = tmp_path / "window.cache"
    cache = window_cached.make_cache(max_kv_size=12)
    window_cached(mx.array([TINY_IDS[:4]], dtype=mx.int32), cache=cache)
    mlxfam.save_prompt_cache(path, cache, window_cached)
    as_saved, _ = mlxfam.load_prompt_cache(path, window_cached)
    assert [layer.settings for layer in as_saved] == [layer.settings for layer in cache]
    with pytest.raises(mlxfam.MlxfamError, match=r"other cache settings: layer 1 has max_kv_size=12 \(asked for 13\)$"):
        mlxfam.load_prompt_cache(path, window_cached, max_kv_size=13)
    full, _ = mlxfam.load(GOLDEN / "gemma2", dtype="float32")  # every layer in a bounded cache of 12
    with pytest.raises(
        mlxfam.MlxfamError, match=r"other cache settings: layer 0 has keep=0 \(asked for 4\), max_kv_size=8 \(asked"
    ):
        mlxfam.load_prompt_cache(path, full, mlxfam.CacheOptions(max_kv_size=12))


def test_prompt_cache_of_another_version_is_refused(tiny, tmp_path):
    path = tmp_path / "old.safetensors"  # mx.save_safetensors adds that suffix to other names
    header = {"format": "mlxfam-prompt-cache", "version": 2}
    mx.save_safetensors(str(path), {"x": mx.zeros(1)}, metadata={"mlxfam.prompt_cache": json.dumps(header)})
    with pytest.raises(mlxfam.MlxfamError, match=r"version 2, expected 'mlxfam-prompt-cache' version 3 \(a file"):
        mlxfam.load_prompt_cache(path, tiny)


def saved_cache(model, path: Path, **settings) -> Path:
    cache = model.make_cache(**settings)
    model(mx.array([TINY_IDS[:4]], dtype=mx.int32), cache=cache)
    mlxfam.save_prompt_cache(path, cache, model)
    return path


def test_prompt_cache_of_another_model_is_refused(tiny, tmp_path):
    path = saved_cache(tiny, tmp_path / "tiny.cache")
    yi, _ = mlxfam.load(GOLDEN / "yi", dtype="float32")
    with pytest.raises(
        mlxfam.MlxfamError,
        match=r"made for another model: config head_dim is 64 there, 16 here.*max_position_embeddings",
    ):
        mlxfam.load_prompt_cache(path, yi)
    other, _ = mlxfam.load(write_tiny_model(tmp_path / "other", seed=1), dtype="float32")
    with pytest.raises(mlxfam.MlxfamError, match=r"made for another model: same config and dtype, but other weights"):
        mlxfam.load_prompt_cache(path, other)
    bf16, _ = mlxfam.load(tmp_path / "other", dtype="bfloat16")
    with pytest.raises(mlxfam.MlxfamError, match=r"made with the model in float32; it is loaded in bfloat16"):
        mlxfam.load_prompt_cache(saved_cache(other, tmp_path / "other.cache"), bf16)


def test_prompt_cache_with_other_settings_is_refused(tiny, tmp_path):
    path = saved_cache(tiny, tmp_path / "q8.cache", kv_bits=8)
    mlxfam.load_prompt_cache(path, tiny, kv_bits=8)
    with pytest.raises(mlxfam.MlxfamError, match=r"other cache settings: .*kv_bits=8 \(asked for 4\)"):
        mlxfam.load_prompt_cache(path, tiny, kv_bits=4)
    with pytest.raises(mlxfam.MlxfamError, match=r"other cache settings: .*max_kv_size=None \(asked for 64\)"):
        mlxfam.load_prompt_cache(path, tiny, kv_bits=8, max_kv_size=64)


def test_a_file_that_is_no_prompt_cache_is_refused(tiny, tmp_path):
    with pytest.raises(mlxfam.MlxfamError, match=r"missing.cache: no such file"):
        mlxfam.load_prompt_cache(tmp_path / "missing.cache", tiny)
    with pytest.raises(mlxfam.MlxfamError, match=r"model.safetensors is not an mlxfam prompt cache"):
        mlxfam.load_prompt_cache(GOLDEN / "yi" / "model.safetensors", tiny)


# The real SmolLM2-135M: the Q4_1 GGUF's weights, dequantized to float16 (the CPU's float16
# quantized matmul is far too slow to test with).


@pytest.fixture(scope="module")
def smollm2_fp16(smollm2_gguf):
    model, tokenizer = mlxfam.load(smollm2_gguf, dtype="float16")
    dequantize_model(model)
    return model, tokenizer


def alice_prompt(tokenizer, length: int = 300) -> mx.array:
    """The first `length` tokens of Alice in Wonderland: a context where most keys sit in packed blocks."""
    return mx.array(tokenizer.encode((DATA / "alice_in_wonderland.txt").read_text())[:length], dtype=mx.int32)


@pytest.mark.end_to_end
@pytest.mark.parametrize(
    ("case", "kv_group_size"),
    [
        ("capital_france", 64),
        ("capital_france", 32),
        ("plain_continuation", 64),
        ("plain_continuation", 32),
        ("alice_300", 64),
    ],
)
def test_8_bit_kv_keeps_the_float16_kv_greedy_tokens(smollm2_fp16, case, kv_group_size):
    """24 greedy tokens: the float16 cache's (on the golden-real prompts, transformers' own) and the
    8-bit cache's are the same. The golden prompts are short (5 and 37 tokens), so most of their keys
    wait in the float tail; on 300 tokens of Alice, all but the last block's are packed. (There, with
    blocks of 32, the 8-bit cache's 4th token differs: not every near-tie survives 8 bits.)"""
    model, tokenizer = smollm2_fp16
    if case == "alice_300":
        prompt, golden = alice_prompt(tokenizer), None
    else:
        golden = np.load(REAL / f"{case}.npz")
        prompt = mx.array(golden["input_ids"])
    float16 = [token for token, _ in mlxfam.generate_step(prompt, model, max_tokens=24)]
    if golden is not None:
        known = min(len(float16), len(golden["greedy_ids"]))
        assert float16[:known] == golden["greedy_ids"].tolist()[:known]
    cache = model.make_cache(kv_bits=8, kv_group_size=kv_group_size)
    eight_bit = [token for token, _ in mlxfam.generate_step(prompt, model, max_tokens=24, cache=cache)]
    assert eight_bit == float16
    assert cache[0].units * kv_group_size == cache[0].offset // kv_group_size * kv_group_size


@pytest.mark.end_to_end
def test_chat_with_quantized_cache_prefills_only_the_new_turn(smollm2_fp16):
    model, tokenizer = smollm2_fp16
    session = ChatSession(model, tokenizer, max_tokens=12, cache_options=mlxfam.CacheOptions(kv_bits=8))
    session.send("What is the capital of France?")
    assert session.cache[0].quantized
    held = len(session.held_ids())
    second = session.send("And of Germany?")
    assert second.prompt_tokens == len(session.prompt_ids(session.messages[:-1])) - held


def stat(stderr: str, label: str) -> int:
    """The token count of the one `--verbose` statistics line starting with `label`."""
    (count,) = [int(line.split()[1]) for line in stderr.splitlines() if line.startswith(label)]
    return count


@pytest.mark.end_to_end
def test_chat_prompt_cache_resumes_across_processes(smollm2_gguf, tmp_path):
    """Two `mlxfam chat --prompt-cache` processes, one turn each, answer as one session would,
    the second prefilling only what its turn adds."""
    path = tmp_path / "chat.cache"
    chat = [sys.executable, "-m", "mlxfam_apps", "chat", str(smollm2_gguf), "--dtype", "float32"]
    chat += ["--max-tokens", "12", "--verbose"]
    command = chat + ["--kv-bits", "8", "--prompt-cache", str(path)]
    turns = ["What is the capital of France?", "And of Germany?"]
    first = subprocess.run(command, input=turns[0] + "\n", capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert path.is_file()
    second = subprocess.run(command, input=turns[1] + "\n", capture_output=True, text=True)
    assert second.returncode == 0, second.stderr

    model, tokenizer = mlxfam.load(smollm2_gguf, dtype="float32")
    session = ChatSession(model, tokenizer, max_tokens=12, cache_options=mlxfam.CacheOptions(kv_bits=8))
    replies = []
    for turn in turns:
        session.send(turn)
        replies.append(session.messages[-1]["content"])
    assert [first.stdout, second.stdout] == [reply + "\n" for reply in replies]
    held = stat(first.stderr, "Prompt:") + stat(first.stderr, "Generation:")
    assert stat(second.stderr, "Prompt:") == len(session.prompt_ids(session.messages[:3])) - held
    _, saved = mlxfam.load_prompt_cache(path, model, kv_bits=8)
    assert saved["chat"]["messages"] == session.messages

    other_settings = subprocess.run(chat + ["--prompt-cache", str(path)], input="hi\n", capture_output=True, text=True)
    assert other_settings.returncode == 2 and "kv_bits=8 (asked for None)" in other_settings.stderr
