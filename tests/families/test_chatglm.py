"""ChatGLM-6B (v1) and ChatGLM2/3: the prompt layout, 2D positions and prefix mask against the
reference's own call trace (the golden meta.json), the rotary variants against the original formulas,
and the config values and checkpoints that must be refused."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxfam
from mlxfam.cache import KVCache
from mlxfam.errors import MlxfamError
from mlxfam.generate import generate_step
from mlxfam.loader import build_model, load_weights, read_config, weight_files
from mlxfam.models import family_for
from mlxfam.models.chatglm import (
    chatglm_config,
    position_ids,
    prompt_layout,
    split_per_head,
)
from mlxfam.models.chatglm2 import ChatGLM2Attention, chatglm2_config

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
VARIANTS = ("chatglm1", "chatglm2", "chatglm3")


def golden(variant):
    return np.load(GOLDEN / variant / "golden.npz")


@pytest.fixture(scope="module")
def chatglm1():
    return mlxfam.load(GOLDEN / "chatglm1", dtype="float32")[0]


def test_one_architecture_name_dispatches_by_config_keys():
    names = {variant: family_for(read_config(GOLDEN / variant)).name for variant in VARIANTS}
    assert names == {"chatglm1": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm2"}


def test_chatglm1_positions_are_the_reference_call_trace():
    meta = json.loads((GOLDEN / "chatglm1" / "meta.json").read_text())
    cfg = chatglm_config(read_config(GOLDEN / "chatglm1"))
    ids = golden("chatglm1")["input_ids"]
    layout = prompt_layout(ids, cfg)
    prompt_len = ids.shape[1]
    assert position_ids(0, prompt_len, layout).tolist() == meta["derived"]["prefill_position_ids"][0]
    for step, expected in enumerate(meta["derived"]["decode_position_ids"]):
        assert position_ids(prompt_len + step, 1, layout).tolist() == expected[0]


def test_chatglm1_rotary_frequencies_are_the_fp16_rounded_ones(chatglm1):
    meta = json.loads((GOLDEN / "chatglm1" / "meta.json").read_text())
    inv_freq = chatglm1.layers[0].self_attn._inv_freq
    assert np.array(inv_freq.astype(mx.float32)).tolist() == meta["derived"]["rotary_inv_freq_fp16_rounded"]


def test_chatglm1_prefix_before_sop_is_visible_to_every_query(chatglm1):
    """The original's get_masks: causal, with columns [0, index of <sop>) visible to all queries."""
    ids = mx.array(golden("chatglm1")["input_ids"])
    cache = chatglm1.make_cache()
    chatglm1.model.embed(ids, cache)  # reads the layout into the cache
    context_length = ids.tolist()[0].index(chatglm1.config.sop_id)
    expected = np.tril(np.ones((ids.shape[1],) * 2, dtype=bool))
    expected[:, :context_length] = True
    assert np.array_equal(np.array(chatglm1.model.make_mask(ids, cache[0], None)), expected)
    cache[0].offset = ids.shape[1]  # a decode step sees every cached key
    assert chatglm1.model.make_mask(ids[:, :1], cache[0], None) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_call_without_cache_matches_the_cached_reference(variant):
    """Positions and masks built from the whole input in one call equal prefill + cached decode."""
    data = golden(variant)
    model, _ = mlxfam.load(GOLDEN / variant, dtype="float32")
    ids = np.concatenate([data["input_ids"][0], data["decode_ids"]])
    logits = np.array(model(mx.array(ids[None], dtype=mx.int32))[0])
    prompt_len = data["input_ids"].shape[1]
    np.testing.assert_allclose(logits[:prompt_len], data["prefill_logits"][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits[prompt_len:], data["decode_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_follows_the_reference_greedy_path(variant):
    data = golden(variant)
    model, _ = mlxfam.load(GOLDEN / variant, dtype="float32")
    steps = generate_step(mx.array(data["input_ids"][0], dtype=mx.int32), model, max_tokens=4)
    assert [token for token, _ in steps] == data["decode_ids"].tolist()


@pytest.mark.parametrize(("ids", "missing"), [([5, 6, 7, 500], r"\[gMASK\]/\[MASK\]"), ([5, 6, 497], "<sop>")])
def test_chatglm1_prompt_without_gmask_and_sop_is_refused(chatglm1, ids, missing):
    with pytest.raises(MlxfamError, match=rf"must end with \[gMASK\] <sop>.*no {missing}"):
        chatglm1(mx.array([ids]))


def test_chatglm1_mask_token_stands_in_for_gmask():
    """Without [gMASK] the first [MASK] gives the mask position, as in the original."""
    cfg = chatglm_config(read_config(GOLDEN / "chatglm1"))
    layout = prompt_layout(np.array([[5, cfg.mask_id, 6, cfg.sop_id]]), cfg)
    assert layout == {"mask_position": 1, "context_length": 3}


def test_chatglm1_head_that_is_not_the_embedding_is_refused():
    directory = GOLDEN / "chatglm1"
    weights = load_weights(weight_files(directory))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    with pytest.raises(MlxfamError, match="lm_head.weight differs from transformer.word_embeddings.weight"):
        build_model(read_config(directory), weights)


def test_fused_qkv_rows_per_head_split_as_the_spec_lays_them_out():
    """ChatGLM-6B: head h owns rows [3dh, 3dh+d) = q_h, then k_h, then v_h."""
    heads, head_dim = 3, 2
    rows = mx.arange(heads * 3 * head_dim)
    q, k, v = split_per_head("qkv", rows, heads, head_dim)
    assert q.tolist() == [0, 1, 6, 7, 12, 13]
    assert k.tolist() == [2, 3, 8, 9, 14, 15]
    assert v.tolist() == [4, 5, 10, 11, 16, 17]


def original_rotary(x: np.ndarray, positions: np.ndarray, base: float, position_divisor: float) -> np.ndarray:
    """docs/families.md#chatglm2: pairs (x[2i], x[2i+1]) of the first half of each head turn by
    (position / position_divisor) * base^(-2i/dims); the second half passes through."""
    dims = x.shape[-1] // 2
    theta = 1.0 / base ** (np.arange(0, dims, 2) / dims)
    angles = (positions / position_divisor)[:, None] * theta
    cos, sin = np.cos(angles), np.sin(angles)
    out = x.copy()
    a, b = x[..., 0:dims:2], x[..., 1:dims:2]
    out[..., 0:dims:2], out[..., 1:dims:2] = a * cos - b * sin, b * cos + a * sin
    return out


def chatglm2_attention(**changes) -> ChatGLM2Attention:
    return ChatGLM2Attention(chatglm2_config({**read_config(GOLDEN / "chatglm2"), **changes}))


@pytest.mark.parametrize(
    ("name", "base", "position_divisor"),
    [("THUDM/chatglm2-6b-32k", 10000.0, 16.0), ("THUDM/chatglm3-6b-32k", 160000.0, 1.0)],
)
def test_rope_ratio_divides_positions_in_chatglm2_and_scales_the_base_in_chatglm3(name, base, position_divisor):
    attention = chatglm2_attention(_name_or_path=name, rope_ratio=16)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 16)).astype(np.float32)
    cache = KVCache()
    cache.offset = 300
    q, _ = attention.rotate(mx.array(x), mx.array(x), cache)
    expected = original_rotary(x, np.arange(300, 305), base, position_divisor)
    np.testing.assert_allclose(np.array(q), expected, atol=2e-5)


@pytest.mark.parametrize(("name", "same"), [("THUDM/chatglm2-6b", True), ("THUDM/chatglm3-6b", False)])
def test_chatglm2_fp16_positions_past_2048_lose_integer_precision(name, same):
    """ChatGLM2 builds its table in the model dtype: in fp16, position 2049 rounds to 2048."""
    attention = chatglm2_attention(_name_or_path=name)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 4, 1, 16)), dtype=mx.float16)

    def rotated_at(position):
        cache = KVCache()
        cache.offset = position
        return np.array(attention.rotate(x, x, cache)[0])

    assert np.array_equal(rotated_at(2049), rotated_at(2048)) == same


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"position_encoding_2d": False}, "position_encoding_2d false"),
        ({"pre_seq_len": 128}, "pre_seq_len"),
        ({"quantization_bit": 4}, "quantization_bit 4"),
    ],
)
def test_chatglm1_unsupported_config_values_are_named(changes, message):
    with pytest.raises(MlxfamError, match=message):
        chatglm_config({**read_config(GOLDEN / "chatglm1"), **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"post_layer_norm": False}, "post_layer_norm False"),
        ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm True"),
        ({"fp32_residual_connection": True}, "fp32_residual_connection True"),
        ({"quantization_bit": 8}, "quantization_bit 8"),
        ({"_name_or_path": "my-finetune", "rope_ratio": 50}, "rope_ratio 50 .*'my-finetune' names neither"),
    ],
)
def test_chatglm2_unsupported_config_values_are_named(changes, message):
    with pytest.raises(MlxfamError, match=message):
        chatglm2_config({**read_config(GOLDEN / "chatglm2"), **changes})
