"""GGUF loading: block formats, llama.cpp's q/k permutation, config from metadata, and the real
SmolLM2-135M GGUF against transformers' logits (tests/data/golden-real)."""

import json
from pathlib import Path

import gguf_writer as gw
import mlx.core as mx
import numpy as np
import pytest

import mlxfam
from mlxfam.errors import MlxfamError

DATA = Path(__file__).parent / "data"
YI = DATA / "golden" / "yi"
REAL = DATA / "golden-real" / "smollm2-135m"

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{_GGUF_NAMES[part]}.weight"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[stem] + ".weight"


def write_yi_gguf(path: Path, kind: int) -> dict[str, np.ndarray]:
    """Writes the yi golden as a llama.cpp GGUF with matrices in `kind`; returns the HF-named
    weights the file encodes (dequantized by the reference decoder)."""
    config = json.loads((YI / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(YI / "model.safetensors")).items()}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, decoded = {}, {}
    for name, w in weights.items():
        target = gw.F32 if w.ndim == 1 else kind
        stored = w
        part = gguf_name(name).split(".")[2] if name.startswith("model.layers.") else None
        if part in heads:
            stored = gw.llama_cpp_permute(w, heads[part])
        data = gw.encode_tensor(stored, target)
        tensors[gguf_name(name)] = (data, w.shape, target)
        if target in (gw.Q4_0, gw.Q4_1, gw.Q8_0):
            # Rows move whole under the permutation, so decoding the unpermuted rows is the same.
            decoded[name] = gw.dequantize(gw.encode_tensor(w, target), target, w.shape)
        else:
            decoded[name] = w.astype(np.float16).astype(np.float32) if target == gw.F16 else w
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "llama.rope.freq_base": config["rope_theta"],
    }
    gw.write(path, metadata, tensors)
    return decoded


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
