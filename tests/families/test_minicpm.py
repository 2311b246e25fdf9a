"""MiniCPM beyond the golden logits: the scaled tied head and refused rope scalings."""

import math

import mlx.core as mx
import numpy as np
import pytest
from golden import GOLDEN, config, golden

import mlxfam
from mlxfam.errors import MlxfamError
from mlxfam.models import minicpm

# --- Baichuan ---


def test_minicpm_divides_the_hidden_state_before_the_tied_head():
    """The fixture is tied (no lm_head tensor); logits of h / (hidden/dim_model_base) are the reference's,
    raw h @ E^T (mlx-lm's tied path) is not."""
    model, _ = mlxfam.load(GOLDEN / "minicpm", dtype="float32")
    assert "lm_head" not in model
    assert model.config.logits_divisor == 2.0  # meta.derived.final_hidden_divisor
    assert model.config.residual_scale == pytest.approx(1.4 / math.sqrt(2))  # meta.derived.residual_branch_scale
    reference = golden("minicpm")
    hidden = model.model(mx.array(reference["input_ids"], dtype=mx.int32))
    undivided = np.array(model.model.embed_tokens.as_linear(hidden))
    assert np.abs(undivided - reference["prefill_logits"]).max() > 0.5


def test_minicpm_refuses_a_rope_scaling_its_code_does_not_have():
    hf = {**config("minicpm"), "rope_scaling": {"type": "yarn", "factor": 2.0}}
    with pytest.raises(MlxfamError, match="rope_scaling"):
        minicpm.minicpm_config(hf)
