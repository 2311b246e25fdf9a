"""Mixtral beyond the golden logits: expert paths, quantized experts, mlx-lm conversions."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from golden import GOLDEN, assert_matches_golden, config, golden
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

import mlxfam
from mlxfam.errors import MlxfamError
from mlxfam.models import mixtral
from mlxfam.models.mixtral import QuantizedSwitchLinear

# --- Baichuan ---


def test_mixtral_sorted_expert_path_matches_the_reference(monkeypatch):
    """Prefill long enough to sort the (token, expert) pairs by expert goes through the other gather_mm path."""
    monkeypatch.setattr(mixtral, "SORT_THRESHOLD", 1)
    model, _ = mlxfam.load(GOLDEN / "mixtral", dtype="float32")
    assert_matches_golden(model, "mixtral")


def test_mixtral_refuses_more_experts_per_token_than_experts():
    hf = {**config("mixtral"), "num_experts_per_tok": 5}
    with pytest.raises(MlxfamError, match="num_experts_per_tok"):
        mixtral.mixtral_config(hf)


def test_mixtral_missing_expert_is_named(tmp_path):
    weights = mx.load(str(GOLDEN / "mixtral" / "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    (tmp_path / "config.json").write_text(json.dumps(config("mixtral")))
    with pytest.raises(MlxfamError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        mlxfam.load(tmp_path)


def test_nn_quantize_turns_the_experts_into_gather_qmm_layers():
    model, _ = mlxfam.load(GOLDEN / "mixtral", dtype="float32")
    nn.quantize(model, group_size=32, bits=8)
    experts = model.layers[0].block_sparse_moe.switch_mlp
    assert all(isinstance(p, QuantizedSwitchLinear) for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    assert (experts.gate_proj.bits, experts.gate_proj.group_size) == (8, 32)
    assert_matches_golden(model, "mixtral", atol=0.05)


@pytest.mark.parametrize("bits", [None, 4])
def test_mixtral_converted_by_mlx_lm_loads_and_agrees_with_mlx_lm(tmp_path, bits):
    """mlx-lm's own Mixtral, given the fixture, saved (stacked experts; quantized when `bits`): mlxfam loads
    the result and gives mlx-lm's logits on it (and the reference's, unquantized)."""
    theirs, mlx_lm_config = load_model(GOLDEN / "mixtral")
    if bits:
        theirs, mlx_lm_config = quantize_model(theirs, mlx_lm_config, group_size=32, bits=bits)
    save_model(tmp_path, theirs)
    save_config(mlx_lm_config, tmp_path / "config.json")
    ours, _ = mlxfam.load(tmp_path)
    if bits:
        assert isinstance(ours.layers[0].block_sparse_moe.switch_mlp.down_proj, QuantizedSwitchLinear)
    else:
        assert_matches_golden(ours, "mixtral")
    ids = mx.array(golden("mixtral")["input_ids"], dtype=mx.int32)
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), atol=1e-4)
