"""Parity with the original implementations: tiny checkpoints in their original HF format and the
logits the reference code produced (tests/data/golden, see its README)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from golden import FP32_TOLERANCE, GOLDEN, VARIANTS, fixture, max_error, run_golden

import mlxfam
from mlxfam.generate import generate_step
from mlxfam.loader import build_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_logits_match_reference(variant):
    golden = np.load(GOLDEN / variant / "golden.npz")
    model, tokenizer = mlxfam.load(GOLDEN / variant, dtype="float32")
    assert tokenizer is None  # the fixtures ship no tokenizer files
    prefill, decode = run_golden(model, golden)
    np.testing.assert_allclose(prefill, golden["prefill_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(decode, golden["decode_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_logits_close_to_reference(variant):
    """bf16 keeps 8 mantissa bits: logits stay within 0.1 x their spread (at least 0.1) of the fp32
    reference. The spread matters: GPT-2's fixture logits have std ~8, and rounding its weights alone
    to bf16 already moves them by 0.14."""
    golden = np.load(GOLDEN / variant / "golden.npz")
    model, _ = mlxfam.load(GOLDEN / variant, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    prefill, decode = run_golden(model, golden)
    atol = 0.1 * max(1.0, float(golden["prefill_logits"].std()))
    np.testing.assert_allclose(prefill, golden["prefill_logits"], atol=atol)
    np.testing.assert_allclose(decode, golden["decode_logits"], atol=atol)


def test_mistral_prompt_is_longer_than_its_window():
    """The mistral fixture only proves the sliding window if the prompt really exceeds it."""
    config = json.loads((GOLDEN / "mistral" / "config.json").read_text())
    prompt_len = np.load(GOLDEN / "mistral" / "golden.npz")["input_ids"].shape[1]
    assert prompt_len > config["sliding_window"]


def test_chunked_prefill_matches_single_pass():
    """Prefill in chunks over the cache (with offsets and the window mask) equals one pass."""
    golden = np.load(GOLDEN / "mistral" / "golden.npz")
    model, _ = mlxfam.load(GOLDEN / "mistral", dtype="float32")
    ids = mx.array(golden["input_ids"], dtype=mx.int32)
    cache = model.make_cache()
    chunks = [model(ids[:, i : i + 5], cache=cache) for i in range(0, ids.shape[1], 5)]
    np.testing.assert_allclose(np.array(mx.concatenate(chunks, axis=1)), golden["prefill_logits"], atol=1e-4)


@pytest.mark.parametrize("variant", ["gemma2", "gpt2"])
def test_chunked_prefill_matches_the_reference(variant):
    """Prefill in chunks: GPT-2's learned positions and Gemma 2's window masks follow the cache offset."""
    config, weights, golden = fixture(variant)
    model = build_model(config, weights, mx.float32)
    ids, cache = mx.array(golden["input_ids"], dtype=mx.int32), model.make_cache()
    chunks = [model(ids[:, i : i + 5], cache=cache) for i in range(0, ids.shape[1], 5)]
    logits = np.array(mx.concatenate(chunks, axis=1))
    np.testing.assert_allclose(logits, golden["prefill_logits"], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


@pytest.mark.parametrize(
    "variant, change",
    [
        ("qwen1", {"use_dynamic_ntk": False}),
        ("qwen1", {"use_logn_attn": False}),
        ("qwen2_swa", {"use_sliding_window": False}),
        # The Qwen2 config docstring's reading (layers below max_window_layers slide) is not the code's.
        ("qwen2_swa", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]}),
        ("internlm2", {"rope_scaling": None}),
    ],
    ids=["qwen1 no NTK", "qwen1 no logn", "qwen2 no window", "qwen2 window on the lower layers", "internlm2 no NTK"],
)
def test_each_quirk_is_needed_to_match_the_reference(variant, change):
    """Without the feature the logits miss the reference by 1000x the fp32 tolerance, so the golden
    test proves each of them."""
    config, weights, golden = fixture(variant)
    assert max_error({**config, **change}, weights, golden) > 1000 * FP32_TOLERANCE


@pytest.mark.parametrize("variant", ["qwen1", "internlm2"])
def test_generation_gives_the_first_forward_the_whole_prompt(variant):
    """Both families' first forward depends on the prompt length (alpha; the dynamic NTK base past
    max_position_embeddings), so a small prefill step must not split the prompt: the greedy tokens
    and their log-probabilities are the reference's."""
    config, weights, golden = fixture(variant)
    model = build_model(config, weights, mx.float32)
    steps = list(generate_step(mx.array(golden["input_ids"][0]), model, prefill_step_size=4, max_tokens=4))
    assert [token for token, _ in steps] == golden["decode_ids"].tolist()
    reference = np.concatenate([golden["prefill_logits"][0, -1:], golden["decode_logits"][:-1]])
    reference = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.array(mx.stack([lp for _, lp in steps])), reference, atol=FP32_TOLERANCE)
