"""KV caches: the standard cache grows in steps; the rotating cache (`max_kv_size`) is exact for a
sliding-window model whose window equals its size, and its memory stays bounded."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxfam
from mlxfam.cache import KVCache, RotatingKVCache

GOLDEN = Path(__file__).parents[1] / "data" / "golden"


def test_standard_cache_preallocates_in_steps():
    cache = KVCache()
    k = mx.ones((1, 2, 3, 4))
    cache.update_and_fetch(k, k)
    assert cache.keys.count == KVCache.step
    for _ in range(KVCache.step - 3):
        keys, _ = cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert keys.shape[2] == cache.offset == KVCache.step and cache.keys.count == KVCache.step
    cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert cache.keys.count == 2 * KVCache.step


@pytest.mark.parametrize("chunk", [12, 5, 1])
def test_rotating_cache_of_window_size_is_exact_for_mistral(chunk):
    """Mistral's window is 8 and its prompt 12: a cache of 8 slots must give the golden logits."""
    golden = np.load(GOLDEN / "mistral" / "golden.npz")
    model, _ = mlxfam.load(GOLDEN / "mistral", dtype="float32")
    cache = model.make_cache(max_kv_size=8, keep=0)
    ids = mx.array(golden["input_ids"], dtype=mx.int32)
    prefill = mx.concatenate([model(ids[:, i : i + chunk], cache=cache) for i in range(0, ids.shape[1], chunk)], 1)
    np.testing.assert_allclose(np.array(prefill), golden["prefill_logits"], atol=1e-4)
    for token, expected in zip(golden["decode_ids"], golden["decode_logits"]):
        logits = model(mx.array([[int(token)]]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(logits), expected, atol=1e-4)
        assert cache[0].keys.count == 8


def test_rotating_cache_larger_than_the_sequence_changes_nothing():
    golden = np.load(GOLDEN / "llama2" / "golden.npz")
    model, _ = mlxfam.load(GOLDEN / "llama2", dtype="float32")
    cache = model.make_cache(max_kv_size=64)
    np.testing.assert_allclose(
        np.array(model(mx.array(golden["input_ids"], dtype=mx.int32), cache=cache)), golden["prefill_logits"], atol=1e-4
    )


def test_rotating_cache_keeps_the_first_tokens_and_the_latest_window():
    cache = RotatingKVCache(max_size=6, keep=2)
    for position in range(20):
        value = mx.full((1, 1, 1, 1), float(position))
        keys, _ = cache.update_and_fetch(value, value)
    assert sorted(np.array(keys).ravel().tolist()) == [0, 1, 16, 17, 18, 19]
    assert cache.keys.count == 6 and cache.offset == 20


def test_rotating_cache_mask_matches_its_visibility_rule():
    cache = RotatingKVCache(max_size=4, keep=1)
    first = mx.zeros((1, 1, 3, 1))
    cache.update_and_fetch(first, first)  # positions 0, 1, 2
    mask = np.array(cache.make_mask(3, None))  # queries 3, 4, 5 over keys 0..5
    expected = [
        [1, 1, 1, 1, 0, 0],  # 3 sees keep {0} and (0, 3]
        [1, 0, 1, 1, 1, 0],  # 4 sees {0} and (1, 4]
        [1, 0, 0, 1, 1, 1],  # 5 sees {0} and (2, 5]
    ]
    assert mask.astype(int).tolist() == expected


def test_keep_must_leave_room():
    with pytest.raises(mlxfam.MlxfamError, match=r"max_kv_size \(4\) must be larger than keep \(4\)"):
        RotatingKVCache(4, keep=4)


class SilentTokenizer:
    """Just enough tokenizer for stream_generate over raw ids."""

    eos_token_ids: list = []

    def detokenizer(self):
        return type("Detokenizer", (), {"add_token": lambda self, t: "", "finalize": lambda self: ""})()


def test_prompt_past_the_context_is_refused_unless_the_cache_is_bounded():
    model, _ = mlxfam.load(GOLDEN / "yi", dtype="float32")  # max_position_embeddings 128
    prompt = list(range(3, 203))
    with pytest.raises(mlxfam.MlxfamError, match=r"200 tokens.*context is 128 tokens.*--max-kv-size"):
        list(mlxfam.stream_generate(model, SilentTokenizer(), prompt, max_tokens=4))
    steps = list(mlxfam.stream_generate(model, SilentTokenizer(), prompt, max_tokens=4, max_kv_size=64))
    assert len(steps) == 4 and steps[-1].finish_reason == "length"
