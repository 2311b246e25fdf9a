"""GGUF loading: block formats, llama.cpp's q/k permutation, config from metadata, and the real
SmolLM2-135M GGUF against transformers' logits (tests/data/golden-real)."""

import json
from pathlib import Path

import gguf_writer as gw
import mlx.core as mx
import numpy as np
import pytest
from gguf_writer import write_yi_gguf

import mlxfam
from mlxfam.errors import MlxfamError

DATA = Path(__file__).parents[1] / "data"
YI = DATA / "golden" / "yi"
REAL = DATA / "golden-real" / "smollm2-135m"


def golden_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(np.asarray(ids).reshape(1, -1), dtype=mx.int32))[0])


@pytest.mark.parametrize("kind", [gw.F32, gw.F16])
def test_float_gguf_matches_golden(tmp_path, kind):
    write_yi_gguf(tmp_path / "yi.gguf", kind)
    model, tokenizer = mlxfam.load(tmp_path / "yi.gguf", dtype="float32")
    assert tokenizer is None  # no tokenizer metadata in this file
    golden = np.load(YI / "golden.npz")
    atol = 1e-4 if kind == gw.F32 else 2e-2
    np.testing.assert_allclose(golden_logits(model, golden["input_ids"][0]), golden["prefill_logits"][0], atol=atol)


@pytest.mark.parametrize("kind", [gw.Q4_0, gw.Q4_1, gw.Q8_0])
def test_quantized_gguf_stays_quantized_and_matches_reference_decoding(tmp_path, kind):
    decoded = write_yi_gguf(tmp_path / "yi.gguf", kind)
    model, _ = mlxfam.load(tmp_path / "yi.gguf", dtype="float32")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == mx.uint32 and q_proj.group_size == 32
    assert q_proj.bits == (8 if kind == gw.Q8_0 else 4)

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    (reference_dir / "config.json").write_text((YI / "config.json").read_text())
    mx.save_safetensors(str(reference_dir / "model.safetensors"), {k: mx.array(v) for k, v in decoded.items()})
    reference, _ = mlxfam.load(reference_dir, dtype="float32")

    ids = np.load(YI / "golden.npz")["input_ids"][0]
    np.testing.assert_allclose(golden_logits(model, ids), golden_logits(reference, ids), atol=1e-4)


def test_gguf_of_unsupported_architecture_is_refused(tmp_path):
    gw.write(
        tmp_path / "x.gguf", {"general.architecture": "mamba"}, {"token_embd.weight": (b"\0" * 128, (1, 32), gw.F32)}
    )
    with pytest.raises(MlxfamError, match="architecture 'mamba' is not supported"):
        mlxfam.load(tmp_path / "x.gguf")


def test_truncated_gguf_names_the_file(tmp_path):
    write_yi_gguf(tmp_path / "yi.gguf", gw.F16)
    data = (tmp_path / "yi.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxfamError, match=r"cut\.gguf: tensor .* lies outside the \d+-byte file \(at byte \d+\)"):
        mlxfam.load(tmp_path / "cut.gguf")


# The real model: transformers' logits for the dequantized SmolLM2-135M-Instruct Q4_1 GGUF.


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return mlxfam.load(smollm2_gguf, dtype="float32")


def test_smollm2_chat_prompt_ids_equal_reference(smollm2):
    _, tokenizer = smollm2
    case = json.loads((REAL / "cases.json").read_text())[0]
    ids = tokenizer.apply_chat_template(case["prompt"], add_generation_prompt=True)
    assert ids == np.load(REAL / f"{case['name']}.npz")["input_ids"].tolist()


def test_smollm2_plain_prompt_ids_equal_reference(smollm2):
    _, tokenizer = smollm2
    case = json.loads((REAL / "cases.json").read_text())[1]
    assert tokenizer.encode(case["prompt"]) == np.load(REAL / f"{case['name']}.npz")["input_ids"].tolist()


@pytest.mark.parametrize("case", ["capital_france", "plain_continuation"])
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, case):
    model, tokenizer = smollm2
    golden = np.load(REAL / f"{case}.npz")
    logits = golden_logits(model, golden["input_ids"])
    assert np.abs(logits[-1] - golden["last_logits"]).max() <= 2e-3
    assert (logits.argmax(-1) == golden["top20_ids"][:, 0]).all()

    greedy = mlxfam.generate_step(mx.array(golden["input_ids"]), model, max_tokens=len(golden["greedy_ids"]))
    assert [token for token, _ in greedy] == golden["greedy_ids"].tolist()

    expected = next(c for c in json.loads((REAL / "cases.json").read_text()) if c["name"] == case)
    text = mlxfam.generate(model, tokenizer, golden["input_ids"].tolist(), max_tokens=len(golden["greedy_ids"]))
    assert text == expected["greedy_text"].removesuffix("<|im_end|>")  # generation stops at EOS


def test_smollm2_exported_to_hf_layout_loads_with_same_logits(smollm2, smollm2_gguf, tmp_path):
    """GGUF -> dequantized HF safetensors directory -> the HF loading path gives the same logits."""
    model, _ = smollm2
    from mlxfam import gguf

    config, weights, _ = gguf.read(Path(smollm2_gguf))
    dense = {}
    for name in [n for n in weights if n.endswith(".weight")]:
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in weights:
            packed, scales = weights[name], weights[f"{stem}.scales"]
            bits = packed.shape[-1] // scales.shape[-1]  # 32-value groups: bits = packed words per group
            biases = weights[f"{stem}.biases"]
            dense[name] = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits)
        else:
            dense[name] = weights[name]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {k: v.astype(mx.float32) for k, v in dense.items()})
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_model, _ = mlxfam.load(tmp_path, dtype="float32")
    golden = np.load(REAL / "capital_france.npz")
    hf_logits = golden_logits(hf_model, golden["input_ids"])
    np.testing.assert_allclose(hf_logits, golden_logits(model, golden["input_ids"]), atol=1e-4)
    assert np.abs(hf_logits[-1] - golden["last_logits"]).max() <= 2e-3
