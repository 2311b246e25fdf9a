"""Rotary scalings against mlx-lm's independent implementation (rope_utils.initialize_rope).

The llama3 scaling is also covered end to end by the llama3 golden; linear, dynamic NTK and
YaRN have no golden of their own in this set."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from mlxfam.models.rope import RopeConfig, RotaryEmbedding

MAX_POS = 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("offset", [0, 100])  # 100 + length is past MAX_POS: dynamic NTK kicks in
def test_rotary_scaling_matches_mlx_lm(name, offset):
    dims, base = 32, 10000.0
    hf = {"rope_scaling": SCALINGS[name], "max_position_embeddings": MAX_POS}
    ours = RotaryEmbedding(RopeConfig.from_hf(hf, dims, base))
    theirs = initialize_rope(dims, base, False, SCALINGS[name], max_position_embeddings=MAX_POS)
    x = mx.random.normal((1, 2, 7, dims), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(ours(x, offset)), np.array(theirs(x, offset=offset)), atol=2e-5)


def test_partial_rotary_leaves_the_rest_untouched():
    rope = RotaryEmbedding(RopeConfig(dims=8, base=10000.0))
    x = mx.random.normal((1, 1, 3, 16), key=mx.random.key(1))
    out = rope(x, 5)
    assert mx.array_equal(out[..., 8:], x[..., 8:])
    assert not mx.allclose(out[..., :8], x[..., :8])


def test_rope_parameters_of_transformers_5_are_read():
    cfg = RopeConfig.from_hf({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, 16, 1e4)
    assert (cfg.rope_type, cfg.base, cfg.scaling) == ("linear", 5e5, {"factor": 2.0})
