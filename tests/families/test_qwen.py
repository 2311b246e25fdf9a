"""Qwen 1, Qwen 1.5/2 beyond the golden logits: the fixtures cross each length threshold, the config
spellings of other releases load the same model, and unsupported values are refused by name."""

import mlx.core as mx
import numpy as np
import pytest
from golden import FP32_TOLERANCE, fixture, max_error

from mlxfam.errors import MlxfamError
from mlxfam.loader import build_model


def test_qwen1_prompt_crosses_seq_length_and_alpha_is_kept():
    """The prompt (24) is past seq_length (16): alpha is 3 (the golden's meta.derived) from prefill
    on, and the decode steps keep it."""
    config, weights, golden = fixture("qwen1")
    assert golden["input_ids"].shape[1] > config["seq_length"]
    model = build_model(config, weights, mx.float32)
    cache = model.make_cache()
    model(mx.array(golden["input_ids"]), cache=cache)
    for token in golden["decode_ids"]:
        model(mx.array([[int(token)]]), cache=cache)
        assert {c.family_state["ntk_alpha"] for c in cache} == {3}


def test_qwen1_decode_past_seq_length_keeps_the_prompt_alpha():
    """A prompt within seq_length gets alpha 1, and decoding on past seq_length keeps it (the original
    never recomputes it from the grown length): the same as running without dynamic NTK."""
    config, weights, golden = fixture("qwen1")
    ids = golden["input_ids"][0]
    prompt, steps = ids[: config["seq_length"]], ids[config["seq_length"] :]

    def run(cfg):
        model = build_model(cfg, weights, mx.float32)
        cache = model.make_cache()
        logits = [model(mx.array(prompt[None]), cache=cache)[0]]
        logits += [model(mx.array([[int(t)]]), cache=cache)[0] for t in steps]
        assert all(c.family_state.get("ntk_alpha", 1) == 1 for c in cache)
        return np.array(mx.concatenate(logits))

    np.testing.assert_array_equal(run(config), run({**config, "use_dynamic_ntk": False}))


def test_qwen1_logn_scales_only_queries_past_seq_length():
    """log(p+1)/log(seq_length) applies where p+1 > seq_length: earlier positions are untouched."""
    config, weights, golden = fixture("qwen1")
    ids = mx.array(golden["input_ids"])
    no_ntk = {**config, "use_dynamic_ntk": False}
    with_logn = np.array(build_model(no_ntk, weights, mx.float32)(ids))[0]
    without = np.array(build_model({**no_ntk, "use_logn_attn": False}, weights, mx.float32)(ids))[0]
    seq_length = config["seq_length"]
    np.testing.assert_array_equal(with_logn[:seq_length], without[:seq_length])
    assert np.abs(with_logn[seq_length:] - without[seq_length:]).max(axis=-1).min() > 1e-3


def test_qwen1_single_pass_without_cache_matches_the_reference():
    """The original's no-cache forward over prompt + decode ids (alpha from its 28 tokens, also 3)
    agrees with the cached goldens (meta.sanity_nocache_vs_cached: 1.4e-6)."""
    config, weights, golden = fixture("qwen1")
    ids = np.concatenate([golden["input_ids"][0], golden["decode_ids"]])
    logits = np.array(build_model(config, weights, mx.float32)(mx.array(ids[None])))[0]
    prompt_len = golden["input_ids"].shape[1]
    np.testing.assert_allclose(logits[:prompt_len], golden["prefill_logits"][0], atol=FP32_TOLERANCE)
    np.testing.assert_allclose(logits[prompt_len:], golden["decode_logits"], atol=FP32_TOLERANCE)


def test_qwen1_aug_2023_field_names_load_the_same_model():
    """Qwen-7B-Chat's first release spells the sizes n_embd, n_head, n_layer, n_positions, ffn_hidden_size;
    without use_dynamic_ntk / use_logn_attn both are on, as the Dec-2023 code defaults them."""
    config, weights, golden = fixture("qwen1")
    del config["use_dynamic_ntk"], config["use_logn_attn"]
    renamed = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
        "intermediate_size": "ffn_hidden_size",
    }
    old = {renamed.get(key, key): value for key, value in config.items()}
    assert max_error(old, weights, golden) < FP32_TOLERANCE


@pytest.mark.parametrize(
    "change, field",
    [
        ({"kv_channels": 32}, "kv_channels"),
        ({"rotary_pct": 1.5}, "rotary_pct"),
        ({"rotary_pct": 0.1}, "rotary_pct"),
        ({"use_cache_quantization": True}, "use_cache_quantization"),
        ({"seq_length": None}, "seq_length"),
    ],
)
def test_qwen1_refuses_unsupported_config(change, field):
    config, weights, _ = fixture("qwen1")
    with pytest.raises(MlxfamError, match=field):
        build_model({**config, **change}, weights)


def test_qwen2_swa_prompt_is_longer_than_its_window_and_upper_layers_slide():
    """The window only gets tested if the prompt exceeds it; layers 1 and 2 (index >= max_window_layers)
    slide, as meta.derived.sliding_layers of the fixture says."""
    config, weights, golden = fixture("qwen2_swa")
    assert golden["input_ids"].shape[1] > config["sliding_window"]
    model = build_model(config, weights)
    assert [layer.sliding_window for layer in model.layers] == [None, 8, 8]
    layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    assert max_error({**config, "layer_types": layer_types}, weights, golden) < FP32_TOLERANCE


def test_qwen2_swa_chunked_prefill_matches_the_reference():
    """Prefill in chunks over the cache: the window masks of the sliding layers follow the offset."""
    config, weights, golden = fixture("qwen2_swa")
    model = build_model(config, weights, mx.float32)
    ids, cache = mx.array(golden["input_ids"]), model.make_cache()
    chunks = [model(ids[:, i : i + 5], cache=cache) for i in range(0, ids.shape[1], 5)]
    np.testing.assert_allclose(np.array(mx.concatenate(chunks, axis=1)), golden["prefill_logits"], atol=FP32_TOLERANCE)


@pytest.mark.parametrize(
    "layer_types", [["sliding_attention"] * 2, ["full_attention", "chunked_attention", "full_attention"]]
)
def test_qwen2_refuses_bad_layer_types(layer_types):
    config, weights, _ = fixture("qwen2_swa")
    with pytest.raises(MlxfamError, match="layer_types"):
        build_model({**config, "layer_types": layer_types}, weights)
