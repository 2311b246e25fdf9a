"""The golden fixtures (tests/data/golden): tiny checkpoints in their original format and the logits their
original code produced, with the helpers tests use to run and change them."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxfam.loader import build_model, load_weights

GOLDEN = Path(__file__).parent / "data" / "golden"
FP32_TOLERANCE = 1e-4  # what the float32 golden test asserts
# bf16 golden logits: within 0.1 x the logits' std (at least 0.1) of the reference.
BF16_TOLERANCE = 0.1
VARIANTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


def run_golden(model, golden):
    """Prefill logits, then each cached decode step fed the golden's own decode ids."""
    cache = model.make_cache()
    prefill = model(mx.array(golden["input_ids"], dtype=mx.int32), cache=cache)
    steps = [model(mx.array([[int(t)]]), cache=cache)[0, -1] for t in golden["decode_ids"]]
    return np.array(prefill.astype(mx.float32)), np.array(mx.stack(steps).astype(mx.float32))


def fixture(variant: str) -> tuple[dict, dict, dict]:
    """(config.json, original tensors, golden arrays) of a golden fixture, for tests that change one of them."""
    path = GOLDEN / variant
    config = json.loads((path / "config.json").read_text())
    return config, load_weights([path / "model.safetensors"]), dict(np.load(path / "golden.npz"))


def max_error(config: dict, weights: dict, golden: dict, dtype=mx.float32) -> float:
    """Largest distance from the reference over prefill and the four cached decode steps."""
    prefill, decode = run_golden(build_model(config, weights, dtype), golden)
    return max(np.abs(prefill - golden["prefill_logits"]).max(), np.abs(decode - golden["decode_logits"]).max())


def golden(variant: str):
    """The golden arrays of a fixture."""
    return np.load(GOLDEN / variant / "golden.npz")


def config(variant: str) -> dict:
    """The config.json of a fixture."""
    return json.loads((GOLDEN / variant / "config.json").read_text())


def assert_matches_golden(model, variant: str, atol: float = 1e-4):
    reference = golden(variant)
    prefill, decode = run_golden(model, reference)
    np.testing.assert_allclose(prefill, reference["prefill_logits"], atol=atol, rtol=atol)
    np.testing.assert_allclose(decode, reference["decode_logits"], atol=atol, rtol=atol)
