"""Gemma 1 and Gemma 2 beyond the golden logits: each quirk is needed to match the reference, the config
spellings real checkpoints use load the same model, and unsupported values are refused by name."""

import pytest
from golden import FP32_TOLERANCE, fixture, max_error

from mlxfam.errors import MlxfamError
from mlxfam.loader import build_model


def test_gemma2_prompt_is_longer_than_its_window():
    """Without this the sliding layers would see the whole prompt and the window would go untested."""
    config, _, golden = fixture("gemma2")
    assert golden["input_ids"].shape[1] > config["sliding_window"]


@pytest.mark.parametrize(
    "change",
    [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"layer_types": ["full_attention"] * 3}],
    ids=["no attention softcap", "no final softcap", "no sliding window"],
)
def test_gemma2_each_quirk_is_needed_to_match_the_reference(change):
    """Dropping one feature moves the logits 100x past the fp32 tolerance (the attention softcap
    alone by ~0.08), so the fp32 golden test proves each of them."""
    config, weights, golden = fixture("gemma2")
    assert max_error({**config, **change}, weights, golden) > 100 * FP32_TOLERANCE


def test_gemma2_honours_layer_types():
    """transformers 5 configs spell the local/global pattern out; the fixture's is the implied one
    (even layers slide), and the opposite pattern misses the reference."""
    config, weights, golden = fixture("gemma2")
    assert "layer_types" not in config
    local, full = "sliding_attention", "full_attention"
    assert max_error({**config, "layer_types": [local, full, local]}, weights, golden) < FP32_TOLERANCE
    assert max_error({**config, "layer_types": [full, local, full]}, weights, golden) > 100 * FP32_TOLERANCE


@pytest.mark.parametrize("layer_types", [["sliding_attention"] * 2, ["sliding_attention", "chunked_attention"] * 2])
def test_gemma2_refuses_bad_layer_types(layer_types):
    config, weights, _ = fixture("gemma2")
    with pytest.raises(MlxfamError, match="layer_types"):
        build_model({**config, "layer_types": layer_types[:3]}, weights)


@pytest.mark.parametrize("drop", ["hidden_act", "hidden_activation"])
def test_gemma_either_activation_field_means_tanh_gelu(drop):
    """Released Gemma configs say hidden_act "gelu" (HF reads it as the tanh GELU); later ones add
    hidden_activation "gelu_pytorch_tanh". Either alone gives the reference logits."""
    config, weights, golden = fixture("gemma")
    del config[drop]
    assert max_error(config, weights, golden) < FP32_TOLERANCE


@pytest.mark.parametrize(
    "field, value", [("hidden_act", "silu"), ("hidden_activation", "gelu"), ("hidden_activation", "relu")]
)
@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_gemma_refuses_other_activations(variant, field, value):
    config, weights, _ = fixture(variant)
    with pytest.raises(MlxfamError, match=f"{field} '{value}' is not supported"):
        build_model({**config, field: value}, weights)


def test_gemma_refuses_a_config_without_head_dim():
    """Gemma's head_dim (32 here, 256 in the releases) is not hidden / heads, so it is never guessed."""
    config, weights, _ = fixture("gemma")
    del config["head_dim"]
    with pytest.raises(MlxfamError, match="head_dim"):
        build_model(config, weights)
