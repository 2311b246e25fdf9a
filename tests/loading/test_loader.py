"""Bad checkpoints and arguments fail with errors that name the file, tensor, field or value."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

import mlxfam
from mlxfam.errors import MlxfamError

LLAMA2 = Path(__file__).parents[1] / "data" / "golden" / "llama2"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A writable copy of the llama2 golden checkpoint."""
    target = tmp_path / "llama2"
    shutil.copytree(LLAMA2, target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def rewrite_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_weights(path: Path, edit):
    weights = dict(mx.load(str(path / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_unknown_model_type_lists_known_ones(checkpoint):
    rewrite_config(checkpoint, model_type="rwkv", architectures=["RwkvForCausalLM"])
    with pytest.raises(
        MlxfamError, match=r"unknown architecture \['RwkvForCausalLM'\].*Known architectures: .*LlamaForCausalLM"
    ):
        mlxfam.load(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MlxfamError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        mlxfam.load(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda w: w.update({"model.layers.0.mystery.weight": mx.zeros((2,))}))
    with pytest.raises(MlxfamError, match=r"unexpected tensor\(s\): model\.layers\.0\.mystery\.weight"):
        mlxfam.load(checkpoint)


def test_shape_mismatch_names_tensor_expected_and_got(checkpoint):
    rewrite_config(checkpoint, intermediate_size=96)
    with pytest.raises(
        MlxfamError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\), expected \(96, 64\)"
    ):
        mlxfam.load(checkpoint)


def test_truncated_safetensors_names_the_file(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxfamError, match=r"model\.safetensors: unreadable or truncated safetensors"):
        mlxfam.load(checkpoint)


def test_no_weights_lists_what_is_there(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(MlxfamError, match=r"no \*\.safetensors weights \(found: config\.json"):
        mlxfam.load(checkpoint)


def test_sharded_checkpoint_loads_through_its_index(checkpoint):
    weights = dict(mx.load(str(checkpoint / "model.safetensors")))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        mx.save_safetensors(str(checkpoint / shard), {n: weights[n] for n in shard_names})
    (checkpoint / "model.safetensors").unlink()
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = mlxfam.load(checkpoint)
    reference, _ = mlxfam.load(LLAMA2)
    ids = mx.array([[1, 2, 3]])
    assert mx.array_equal(model(ids), reference(ids))


def test_missing_shard_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(MlxfamError, match="shard.*not present: model-00002-of-00002.safetensors"):
        mlxfam.load(checkpoint)


def test_unsupported_rope_scaling_is_refused(checkpoint):
    rewrite_config(checkpoint, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(MlxfamError, match="rope scaling type 'longrope' is not supported"):
        mlxfam.load(checkpoint)


def test_unsupported_activation_is_refused(checkpoint):
    rewrite_config(checkpoint, hidden_act="relu")
    with pytest.raises(MlxfamError, match="hidden_act 'relu' is not supported"):
        mlxfam.load(checkpoint)


def test_bad_dtype_is_refused():
    with pytest.raises(MlxfamError, match="dtype must be one of float16, bfloat16, float32, got 'float8'"):
        mlxfam.load(LLAMA2, dtype="float8")
