"""Parity with the original implementations: tiny checkpoints in their original HF format and the
logits the reference code produced (tests/data/golden, see its README)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxfam
from mlxfam.loader import build_model, load_weights

GOLDEN = Path(__file__).parent / "data" / "golden"
VARIANTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


def run_golden(model, golden):
    """Prefill logits, then each cached decode step fed the golden's own decode ids."""
    cache = model.make_cache()
    prefill = model(mx.array(golden["input_ids"], dtype=mx.int32), cache=cache)
    steps = [model(mx.array([[int(t)]]), cache=cache)[0, -1] for t in golden["decode_ids"]]
    return np.array(prefill.astype(mx.float32)), np.array(mx.stack(steps).astype(mx.float32))


def fixture(variant: str) -> tuple[dict, dict, dict]:
    """(config.json, original tensors, golden arrays) of a golden fixture, for tests that change one of them."""
    path = GOLDEN / variant
    config = json.loads((path / "config.json").read_text())
    return config, load_weights([path / "model.safetensors"]), dict(np.load(path / "golden.npz"))


def max_error(config: dict, weights: dict, golden: dict, dtype=mx.float32) -> float:
    """Largest distance from the reference over prefill and the four cached decode steps."""
    prefill, decode = run_golden(build_model(config, weights, dtype), golden)
    return max(np.abs(prefill - golden["prefill_logits"]).max(), np.abs(decode - golden["decode_logits"]).max())


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
