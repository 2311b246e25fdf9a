"""Qwen 1, Qwen 1.5/2, InternLM 1 and InternLM2 beyond the golden logits (tests/data/golden): the
fixtures really cross each length threshold, each quirk is needed to match the reference, the config
spellings of other releases load the same model, InternLM 1's dynamic rotary (no golden) matches a
float64 re-implementation of the later original code, and unsupported values are refused by name."""

import mlx.core as mx
import numpy as np
import pytest
from mlxfam.kernels.rope import rope, rope_table
from test_golden import fixture, max_error

from mlxfam.errors import MlxfamError
from mlxfam.generate import generate_step
from mlxfam.loader import build_model

FP32_TOLERANCE = 1e-4  # what tests/test_golden.py asserts


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


@pytest.mark.parametrize("rotary_type", ["origin", "dynamic"])
def test_internlm1_rotary_types_match_the_reference_below_max_positions(rotary_type):
    """The fixture (16 tokens, max_position_embeddings 64) comes from code without a `rotary` field;
    the later code's origin and dynamic types give the same logits below max_position_embeddings."""
    config, weights, golden = fixture("internlm1")
    assert "rotary" not in config
    assert max_error({**config, "rotary": {"type": rotary_type, "base": 10000}}, weights, golden) < FP32_TOLERANCE


def internlm_dynamic_reference(config: dict, weights: dict, chunks: list) -> list[np.ndarray]:
    """float64 forward of the later InternLM code (docs/families.md#internlm), chunk after chunk: keys are
    cached un-rotated and, each forward, all of them are rotated with the table for the total length L
    (base * (f*L/max_pos - (f-1))^(d/(d-2)) past max_pos), as is the query."""
    w = {name: np.array(t, dtype=np.float64) for name, t in weights.items()}
    heads, eps = config["num_attention_heads"], config["rms_norm_eps"]
    d = config["hidden_size"] // heads
    rotary, max_pos = config["rotary"], config["max_position_embeddings"]
    factor = rotary.get("scaling_factor", 1.0)

    def norm(x, weight):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * weight

    def rotate(x, positions, inv_freq):  # x: (heads, n, d), half-split pairs (i, i + d/2)
        angles = positions[:, None] * inv_freq
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        cos, sin = np.cos(angles), np.sin(angles)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    layers = config["num_hidden_layers"]
    raw_keys, values = [np.zeros((heads, 0, d))] * layers, [np.zeros((heads, 0, d))] * layers
    offset, out = 0, []
    for ids in chunks:
        n = len(ids)
        total = offset + n
        base = rotary["base"]
        if total > max_pos:
            base *= (factor * total / max_pos - (factor - 1)) ** (d / (d - 2))
        inv_freq = base ** (-np.arange(0, d, 2) / d)
        h = w["model.embed_tokens.weight"][ids]
        for i in range(layers):
            p = f"model.layers.{i}."
            x = norm(h, w[p + "input_layernorm.weight"])
            q, k, v = (
                (x @ w[f"{p}self_attn.{proj}_proj.weight"].T + w[f"{p}self_attn.{proj}_proj.bias"])
                .reshape(n, heads, d)
                .transpose(1, 0, 2)
                for proj in "qkv"
            )
            raw_keys[i] = np.concatenate([raw_keys[i], k], axis=1)
            values[i] = np.concatenate([values[i], v], axis=1)
            q = rotate(q, np.arange(offset, total), inv_freq)
            keys = rotate(raw_keys[i], np.arange(total), inv_freq)
            scores = q @ keys.transpose(0, 2, 1) / np.sqrt(d)
            scores[:, np.arange(total)[None] > np.arange(offset, total)[:, None]] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            attended = (probs / probs.sum(-1, keepdims=True)) @ values[i]
            h = h + attended.transpose(1, 0, 2).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = h + w[p + "self_attn.o_proj.bias"]
            x = norm(h, w[p + "post_attention_layernorm.weight"])
            gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
            h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        out.append(norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T)
        offset = total
    return out


@pytest.mark.parametrize("max_kv_size", [None, 64], ids=["cache", "rotating cache"])
def test_internlm1_dynamic_rotary_past_max_positions_matches_the_original_code(max_kv_size):
    """With max_position_embeddings 8 the base changes at every step, and every cached key is
    rotated again with it: prefill and each decode step of the golden ids match the reference."""
    config, weights, golden = fixture("internlm1")
    rotary = {"type": "dynamic", "base": 10000, "scaling_factor": 2.0}
    config = {**config, "max_position_embeddings": 8, "rotary": rotary}
    chunks = [golden["input_ids"][0].tolist(), *([int(t)] for t in golden["decode_ids"])]
    expected = internlm_dynamic_reference(config, weights, chunks)
    model = build_model(config, weights, mx.float32)
    cache = model.make_cache(max_kv_size=max_kv_size)
    for chunk, reference in zip(chunks, expected, strict=True):
        np.testing.assert_allclose(np.array(model(mx.array([chunk]), cache=cache))[0], reference, atol=FP32_TOLERANCE)
    origin = {**config, "rotary": {"type": "origin", "base": 10000}}
    fixed_base = np.array(build_model(origin, weights, mx.float32)(mx.array([chunks[0]])))[0]
    assert np.abs(fixed_base - expected[0]).max() > 0.01


def test_keys_in_slot_order_are_rotated_at_their_own_positions():
    """InternLM's dynamic rotary re-rotates the keys a rotating cache hands back, in its slot order:
    a table of their positions turns each as mx.fast.rope turns it alone at its position."""
    keys = mx.random.normal((1, 2, 6, 16), key=mx.random.key(0))
    positions = np.array([9, 2, 0, 7, 3, 12])
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    cos, sin = rope_table(mx.array(positions)[None], inv_freq.astype(np.float32))
    rotated = rope(keys, cos, sin, rotary_dims=16, interleaved=False)
    for slot, position in enumerate(positions):
        key = keys[:, :, slot : slot + 1]
        one = mx.fast.rope(key, 16, traditional=False, base=10000.0, scale=1.0, offset=int(position))
        np.testing.assert_allclose(np.array(rotated[:, :, slot : slot + 1]), np.array(one), atol=1e-5)


@pytest.mark.parametrize(
    "variant, change, field",
    [
        ("internlm1", {"rotary": {"type": "xpos", "base": 10000}}, "rotary"),
        ("internlm1", {"rotary": {"type": "dynamic"}}, "rotary"),
        ("internlm2", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ("internlm2", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_internlm_refuses_unsupported_config(variant, change, field):
    config, weights, _ = fixture(variant)
    with pytest.raises(MlxfamError, match=field):
        build_model({**config, **change}, weights)


def test_internlm2_refuses_a_wqkv_of_the_wrong_size():
    config, weights, _ = fixture("internlm2")
    name = "model.layers.0.attention.wqkv.weight"
    with pytest.raises(MlxfamError, match=name):
        build_model(config, {**weights, name: weights[name][:-16]})
