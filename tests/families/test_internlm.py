"""InternLM 1 and InternLM2 beyond the golden logits: InternLM 1's dynamic rotary (no golden) against a
float64 re-implementation of the later original code, and unsupported values refused by name."""

import mlx.core as mx
import numpy as np
import pytest
from golden import FP32_TOLERANCE, fixture, max_error
from mlxfam.kernels.rope import rope, rope_table

from mlxfam.errors import MlxfamError
from mlxfam.loader import build_model


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
