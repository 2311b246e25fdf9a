"""GPT-2 beyond the golden logits: the transformer. prefix, its position limit, refused config values."""

import mlx.core as mx
import pytest
from golden import FP32_TOLERANCE, fixture, max_error

from mlxfam.errors import MlxfamError
from mlxfam.loader import build_model


def test_gpt2_accepts_the_transformer_prefix():
    """Hub GPT-2 files have bare names (wte, h.0...); files saved by transformers prefix `transformer.`."""
    config, weights, golden = fixture("gpt2")
    prefixed = {f"transformer.{name}": tensor for name, tensor in weights.items()}
    assert max_error(config, prefixed, golden) < FP32_TOLERANCE


def test_gpt2_positions_past_n_positions_are_refused():
    config, weights, _ = fixture("gpt2")
    model = build_model(config, weights, mx.float32)
    n_positions = config["n_positions"]
    cache = model.make_cache()
    model(mx.zeros((1, n_positions), dtype=mx.int32), cache=cache)  # exactly the context: fine
    with pytest.raises(MlxfamError, match=f"learned positions for {n_positions} tokens"):
        model(mx.zeros((1, 1), dtype=mx.int32), cache=cache)
    with pytest.raises(MlxfamError, match="n_positions"):
        model(mx.zeros((1, n_positions + 1), dtype=mx.int32))


@pytest.mark.parametrize(
    "field, value",
    [("activation_function", "relu"), ("activation_function", "gelu"), ("scale_attn_by_inverse_layer_idx", True)],
)
def test_gpt2_refuses_unsupported_config(field, value):
    config, weights, _ = fixture("gpt2")
    with pytest.raises(MlxfamError, match=field):
        build_model({**config, field: value}, weights)
