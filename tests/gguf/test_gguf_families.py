"""GGUF files llama.cpp's own converter wrote from the golden checkpoints (tests/data/gguf, README there): each
float32 file gives the golden logits where the format carries the family's semantics; each Q8_0 file gives the
logits of its own weights dequantized by the `gguf` package (float32, through the HF-config path)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from golden import FP32_TOLERANCE, assert_matches_golden, golden, run_golden

import mlxfam
from mlxfam import gguf
from mlxfam.loader import build_model

GGUF = Path(__file__).parents[1] / "data" / "gguf"

# fixture -> the golden checkpoint it was converted from
EXACT = {"mixtral": "mixtral", "gpt2": "gpt2", "minicpm": "minicpm"}
# fixture -> what the format drops; the reference (<fixture>.npz, tests/fixtures/make_gguf_references.py) is
# transformers on the golden checkpoint without it, as llama.cpp computes the file.
LLAMA_CPP_SEMANTICS = {"mistral": "sliding window", "internlm2": "dynamic NTK"}
QUANTIZED = {"mixtral-q8_0": "mixtral", "gpt2-q8_0": "gpt2"}


@pytest.mark.parametrize("fixture", sorted(EXACT))
def test_float32_gguf_gives_golden_logits(fixture):
    model, _ = mlxfam.load(GGUF / f"{fixture}.gguf", dtype="float32")
    assert_matches_golden(model, EXACT[fixture], atol=FP32_TOLERANCE)


@pytest.mark.parametrize("fixture", sorted(LLAMA_CPP_SEMANTICS))
def test_float32_gguf_gives_llama_cpp_logits_where_the_format_drops_a_feature(fixture):
    model, _ = mlxfam.load(GGUF / f"{fixture}.gguf", dtype="float32")
    reference = np.load(GGUF / f"{fixture}.npz")
    prefill, decode = run_golden(model, reference)
    np.testing.assert_allclose(prefill, reference["prefill_logits"], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    np.testing.assert_allclose(decode, reference["decode_logits"], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    # ... and the feature matters on this input: the golden (with it) differs.
    assert np.abs(prefill - golden(fixture)["prefill_logits"]).max() > 100 * FP32_TOLERANCE


@pytest.mark.parametrize("fixture", sorted(QUANTIZED))
def test_q8_0_gguf_stays_quantized_and_gives_its_dequantized_logits(fixture, monkeypatch):
    path = GGUF / f"{fixture}.gguf"
    model, _ = mlxfam.load(path, dtype="float32")
    reference = golden(QUANTIZED[fixture])
    prefill, decode = run_golden(model, reference)

    _, weights, _ = gguf.read(path)
    assert any(name.endswith(".scales") for name in weights)  # Q8_0 tensors stay quantized

    reader = GGUFReader(path)
    dequantized = {
        t.name: mx.array(dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]))
        for t in reader.tensors
    }
    # The same names and conversions, over the float32 tensors of the `gguf` package's dequantization.
    monkeypatch.setattr(gguf, "_mlx_tensors", lambda gguf_file, _: dict(dequantized))
    config, weights, _ = gguf.read(path)
    expected_prefill, expected_decode = run_golden(build_model(config, weights, mx.float32), reference)
    np.testing.assert_allclose(prefill, expected_prefill, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    np.testing.assert_allclose(decode, expected_decode, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def test_tokenizer_chat_template_and_stop_ids_come_from_the_metadata():
    _, tokenizer = mlxfam.load(GGUF / "mixtral.gguf", dtype="float32")
    assert tokenizer.eos_token_ids == [2] and tokenizer.bos_token_id == 1
    text = tokenizer.render_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>[INST] hi [/INST]"  # the template tokenizer_config.json gave the converter


def test_gpt2_vocabulary_round_trips_text():
    _, tokenizer = mlxfam.load(GGUF / "gpt2.gguf", dtype="float32")
    assert tokenizer.eos_token_ids == [511]
    text = "def main(argv):\n    return 0  # ok"
    assert tokenizer.decode(tokenizer.encode(text)) == text
