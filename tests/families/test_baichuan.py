"""Baichuan 1/2 beyond the golden logits: ALiBi slopes and masks, NormHead, the variant rules."""

import mlx.core as mx
import numpy as np
import pytest
from golden import GOLDEN, assert_matches_golden, config, golden, run_golden

import mlxfam
from mlxfam.cache import RotatingKVCache
from mlxfam.errors import MlxfamError
from mlxfam.models import baichuan

# --- Baichuan ---


def test_alibi_slopes_follow_the_closed_form_rule():
    """docs/families.md#alibi: a power of two n gives 2^(-8(k+1)/n); otherwise the slopes of the nearest lower
    power of two m, then every other slope of the 2m series (40 heads: 2^(-(k+1)/4), then 2^(-(2j+1)/8))."""
    six = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]  # also the golden's meta.derived.alibi_slopes
    forty = [2 ** (-(k + 1) / 4) for k in range(32)] + [2 ** (-(2 * j + 1) / 8) for j in range(8)]
    np.testing.assert_allclose(baichuan.alibi_slopes(6), six, rtol=1e-12)
    np.testing.assert_allclose(baichuan.alibi_slopes(40), forty, rtol=1e-12)
    np.testing.assert_allclose(baichuan.alibi_slopes(8), [2.0 ** -(k + 1) for k in range(8)], rtol=1e-12)


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_13b"])
def test_alibi_with_a_rotating_cache_matches_the_full_cache(variant):
    """The bias follows the rotating cache's slot positions: a bounded cache larger than the sequence,
    prefilled in chunks, gives the reference logits like the full cache does."""
    model, _ = mlxfam.load(GOLDEN / variant, dtype="float32")
    reference = golden(variant)
    ids = mx.array(reference["input_ids"], dtype=mx.int32)
    cache = model.make_cache(max_kv_size=ids.shape[1] + 8)
    assert isinstance(cache[0], RotatingKVCache)
    prefill = mx.concatenate([model(ids[:, i : i + 5], cache=cache) for i in range(0, ids.shape[1], 5)], axis=1)
    decode = mx.stack([model(mx.array([[int(t)]]), cache=cache)[0, -1] for t in reference["decode_ids"]])
    full_prefill, full_decode = run_golden(model, reference)
    np.testing.assert_allclose(np.array(prefill), full_prefill, atol=1e-5)
    np.testing.assert_allclose(np.array(decode), full_decode, atol=1e-5)
    np.testing.assert_allclose(np.array(decode), reference["decode_logits"], atol=1e-4)


def test_norm_head_is_applied_once_at_load_and_matters():
    """Baichuan 2 normalises the lm_head rows (the fixture's rows have random norms); with the raw rows the
    logits are far from the reference, with the normalised ones they match it."""
    raw_head = mx.load(str(GOLDEN / "baichuan2_13b" / "model.safetensors"))["lm_head.weight"]
    raw_norms = np.linalg.norm(np.array(raw_head), axis=1)
    assert raw_norms.std() > 0.1
    model, _ = mlxfam.load(GOLDEN / "baichuan2_13b", dtype="float32")
    np.testing.assert_allclose(np.linalg.norm(np.array(model.lm_head.weight), axis=1), 1.0, rtol=1e-6)
    assert_matches_golden(model, "baichuan2_13b")

    model.lm_head.weight = raw_head
    prefill, _ = run_golden(model, golden("baichuan2_13b"))
    assert np.abs(prefill - golden("baichuan2_13b")["prefill_logits"]).max() > 1.0


def test_baichuan_1_head_is_left_as_it_is():
    model, _ = mlxfam.load(GOLDEN / "baichuan1_13b", dtype="float32")
    raw_head = mx.load(str(GOLDEN / "baichuan1_13b" / "model.safetensors"))["lm_head.weight"]
    assert mx.array_equal(model.lm_head.weight, raw_head)


@pytest.mark.parametrize(
    "variant, alibi, norm_head, context",
    [
        ("baichuan1_7b", False, False, 64),
        ("baichuan1_13b", True, False, 64),
        ("baichuan2_7b", False, True, 64),
        ("baichuan2_13b", True, True, 64),
    ],
)
def test_baichuan_variant_is_read_off_the_config(variant, alibi, norm_head, context):
    cfg = baichuan.baichuan_config(config(variant))
    assert (cfg.rope is None) == alibi
    assert cfg.norm_head == norm_head
    assert cfg.max_position_embeddings == context


def test_baichuan2_is_recognised_by_its_vocab_size():
    """The real Baichuan2 configs have vocab 125696; that alone marks NormHead."""
    hf = {**config("baichuan1_13b"), "vocab_size": baichuan.BAICHUAN2_VOCAB_SIZE}
    assert baichuan.baichuan_config(hf).norm_head


def test_baichuan_without_a_context_length_is_refused():
    hf = {k: v for k, v in config("baichuan2_13b").items() if k != "model_max_length"}
    with pytest.raises(MlxfamError, match="model_max_length"):
        baichuan.baichuan_config(hf)


def test_bad_w_pack_is_named():
    cfg = baichuan.baichuan_config(config("baichuan1_7b"))
    with pytest.raises(MlxfamError, match=r"model\.layers\.0\.self_attn\.W_pack\.weight"):
        baichuan.sanitize({"model.layers.0.self_attn.W_pack.weight": mx.zeros((64 * 2, 64))}, cfg)
