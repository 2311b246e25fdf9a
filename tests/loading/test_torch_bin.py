"""Legacy PyTorch `.bin` weights (torch.save's zip format), read without torch.

The checkpoints are written by tests/torch_bin_writer.py in the layout torch.save produces, from the
llama2 golden fixture's weights; a model loaded from them must reproduce the reference logits of
the original code (golden.npz), and planted pickle payloads must be refused without running.
"""

import builtins
import json
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch_bin_writer as tw
from golden import run_golden
from huggingface_hub.utils import filter_repo_objects

import mlxfam
from mlxfam import hub, torch_bin
from mlxfam.errors import MlxfamError

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "llama2"
REAL_TORCH = Path(__file__).parents[1] / "data" / "torch_bin"  # written by torch.save itself, see its README


@pytest.fixture(scope="module")
def golden_weights() -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array in mx.load(str(GOLDEN / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden.npz")


def model_dir(tmp_path: Path, name: str = "model") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(GOLDEN / "config.json", directory)
    return directory


def torch_layouts(weights: dict[str, np.ndarray]) -> dict[str, tw.TensorView]:
    """The float32 weights laid out the ways torch leaves tensors in a state dict: most own a
    contiguous storage; lm_head is a transposed view (strides (1, rows)); layer 0's o_proj is a
    transposed view at an offset inside a larger storage; layer 1's q/k/v projections are three
    offset views of one shared storage (as the split views of a fused qkv weight are)."""
    layouts = {name: tw.contiguous(array, "FloatStorage") for name, array in weights.items()}

    def transposed(array: np.ndarray, offset: int) -> tw.TensorView:
        padding = np.full(offset, np.nan, dtype=np.float32)  # never read: NaNs would reach the logits
        storage = tw.StorageData("FloatStorage", np.concatenate([padding, array.T.reshape(-1)]))
        return tw.TensorView(storage, offset, array.shape, (1, array.shape[0]))

    layouts["lm_head.weight"] = transposed(weights["lm_head.weight"], 0)
    layouts["model.layers.0.self_attn.o_proj.weight"] = transposed(weights["model.layers.0.self_attn.o_proj.weight"], 7)
    qkv = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    shared = tw.StorageData("FloatStorage", np.concatenate([weights[name].reshape(-1) for name in qkv]))
    for i, name in enumerate(qkv):
        rows, cols = weights[name].shape
        layouts[name] = tw.TensorView(shared, i * rows * cols, (rows, cols), (cols, 1))
    return layouts


def assert_matches_golden(directory: Path, golden):
    model, _ = mlxfam.load(directory, dtype="float32")
    prefill, decode = run_golden(model, golden)
    np.testing.assert_allclose(prefill, golden["prefill_logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(decode, golden["decode_logits"], atol=1e-4, rtol=1e-4)


def test_file_written_by_torch_itself():
    """Views, shared storages, every dtype, a Parameter and `_metadata`, as PyTorch 2.14 saved them."""
    expected = np.load(REAL_TORCH / "expected.npz")
    tensors = torch_bin.load(REAL_TORCH / "state_dict.bin")
    assert sorted(tensors) == sorted(expected.files)
    assert tensors["float16"].dtype == mx.float16 and tensors["bfloat16"].dtype == mx.bfloat16
    for name in expected.files:
        array = tensors[name].astype(mx.float32) if tensors[name].dtype == mx.bfloat16 else tensors[name]
        assert np.array(array).dtype == expected[name].dtype, name
        np.testing.assert_array_equal(np.array(array), expected[name], err_msg=name)


def test_writer_lays_records_out_as_torch_does(tmp_path, golden_weights):
    """The fixture files themselves: one folder named after the file, stored records, 64-byte aligned data."""
    path = tmp_path / "pytorch_model.bin"
    tw.save(path, torch_layouts(golden_weights))
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        names = archive.namelist()
        assert names[:2] == ["pytorch_model/data.pkl", "pytorch_model/byteorder"]
        assert names[-1] == "pytorch_model/version" and archive.read(names[-1]) == b"3\n"
        for info in archive.infolist():
            file.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0
    data_pkl = archive_record(path, "data.pkl")
    assert data_pkl.startswith(b"\x80\x02") and b"ctorch._utils\n_rebuild_tensor_v2\n" in data_pkl


def archive_record(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(f"{path.stem}/{name}")


def test_single_bin_gives_the_reference_logits(tmp_path, golden_weights, golden):
    directory = model_dir(tmp_path)
    tw.save(directory / "pytorch_model.bin", torch_layouts(golden_weights))
    assert_matches_golden(directory, golden)


def test_sharded_bin_with_index_gives_the_reference_logits(tmp_path, golden_weights, golden):
    directory = model_dir(tmp_path)
    layouts = torch_layouts(golden_weights)
    names = sorted(layouts)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, shard_names in shards.items():
        tw.save(directory / shard, {name: layouts[name] for name in shard_names})
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_matches_golden(directory, golden)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 by truncation: the high 16 bits of each float32."""
    return (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_float16_and_bfloat16_tensors_match_the_safetensors_path(tmp_path, golden_weights, golden):
    embed, up = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
    half = golden_weights[embed].astype(np.float16)
    bits = bfloat16_bits(golden_weights[up])
    layouts = torch_layouts(golden_weights)
    layouts[embed] = tw.contiguous(half, "HalfStorage")
    layouts[up] = tw.contiguous(bits, "BFloat16Storage")
    bin_dir = model_dir(tmp_path, "bin")
    tw.save(bin_dir / "pytorch_model.bin", layouts)

    tensors = torch_bin.load(bin_dir / "pytorch_model.bin")
    assert tensors[embed].dtype == mx.float16 and tensors[up].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(tensors[embed]), half)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)  # bfloat16 -> float32 is exact
    np.testing.assert_array_equal(np.array(tensors[up].astype(mx.float32)), widened)

    safetensors_dir = model_dir(tmp_path, "safetensors")
    same = {name: mx.array(array) for name, array in golden_weights.items()}
    same[embed] = mx.array(half)
    same[up] = mx.array(widened).astype(mx.bfloat16)  # exact: widened values are bfloat16 values
    mx.save_safetensors(str(safetensors_dir / "model.safetensors"), same)

    logits = []
    for directory in (bin_dir, safetensors_dir):
        model, _ = mlxfam.load(directory, dtype="float32")
        logits.append(run_golden(model, golden))
    np.testing.assert_array_equal(logits[0][0], logits[1][0])
    np.testing.assert_array_equal(logits[0][1], logits[1][1])
    np.testing.assert_allclose(logits[0][0], golden["prefill_logits"], atol=0.1)  # two rounded tensors


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_buffers_parameters_and_metadata(tmp_path, byteorder):
    """Integer and bool buffers, an nn.Parameter, a state dict's `_metadata` and a big-endian archive."""
    arrays = {
        "positions": np.arange(-3, 5, dtype=np.int64).reshape(2, 4),
        "ids": np.array([7, -1, 2**31 - 1], dtype=np.int32),
        "small": np.array([-128, 5, 127], dtype=np.int8),
        "shorts": np.array([-300, 300], dtype=np.int16),
        "bytes": np.array([0, 200, 255], dtype=np.uint8),
        "mask": np.array([[True, False], [False, True]]),
        "scale": np.array([1.5, -2.25], dtype=np.float32),
    }
    storage_types = {
        np.int64: "LongStorage", np.int32: "IntStorage", np.int8: "CharStorage", np.int16: "ShortStorage",
        np.uint8: "ByteStorage", np.bool_: "BoolStorage", np.float32: "FloatStorage",
    }  # fmt: skip
    state = OrderedDict((name, tw.contiguous(a, storage_types[a.dtype.type])) for name, a in arrays.items())
    state["scale"] = tw.Parameter(state["scale"])
    state._metadata = OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    tw.save(tmp_path / "buffers.bin", state, byteorder=byteorder)
    tensors = torch_bin.load(tmp_path / "buffers.bin")
    assert list(tensors) == list(arrays)
    for name, array in arrays.items():
        assert np.array(tensors[name]).dtype == array.dtype
        np.testing.assert_array_equal(np.array(tensors[name]), array)


def test_views_of_one_storage_come_out_independent(tmp_path):
    """A row, a column (strided), an expanded (stride 0) and an empty view of one storage."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    storage = tw.StorageData("FloatStorage", base.reshape(-1))
    state = {
        "row": tw.TensorView(storage, 4, (4,), (1,)),
        "column": tw.TensorView(storage, 2, (3,), (4,)),
        "expanded": tw.TensorView(storage, 5, (2, 3), (0, 1)),
        "empty": tw.TensorView(storage, 12, (0, 4), (4, 1)),
    }
    tw.save(tmp_path / "views.bin", state)
    tensors = torch_bin.load(tmp_path / "views.bin")
    np.testing.assert_array_equal(np.array(tensors["row"]), base[1])
    np.testing.assert_array_equal(np.array(tensors["column"]), base[:, 2])
    np.testing.assert_array_equal(np.array(tensors["expanded"]), np.broadcast_to(base.reshape(-1)[5:8], (2, 3)))
    assert tensors["empty"].shape == (0, 4)


# --- planted code ------------------------------------------------------------------------------


class Planted:
    """An object whose unpickling calls `function(*args)`: what a malicious checkpoint carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Planted]:
    """Each would create `marker` if it ran; keyed by the global the pickle names."""
    return {
        "posix.system": Planted(os.system, f"touch {marker}"),
        "builtins.exec": Planted(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Planted(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": Planted(subprocess.Popen, ["touch", str(marker)]),
    }


def test_planted_payload_is_live_under_plain_pickle(tmp_path):
    """The control: the same bytes given to plain pickle do run their code."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(payloads(marker)["builtins.exec"], protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])  # GLOBAL+REDUCE, the same in binary, STACK_GLOBAL
@pytest.mark.parametrize("forbidden", ["posix.system", "builtins.exec", "builtins.eval", "subprocess.Popen"])
def test_planted_payload_is_refused_before_it_runs(tmp_path, forbidden, protocol):
    marker = tmp_path / "ran"
    planted = pickle.dumps({"model.norm.weight": payloads(marker)[forbidden]}, protocol=protocol)
    path = tmp_path / "pytorch_model.bin"
    tw.write_records(path, [("data.pkl", planted), ("byteorder", b"little"), ("version", b"3\n")])
    with pytest.raises(MlxfamError, match=rf"pytorch_model\.bin: data\.pkl: refusing forbidden global {forbidden}"):
        torch_bin.load(path)
    assert not marker.exists()


def test_payload_after_real_tensors_is_refused(tmp_path, golden_weights):
    """Tensors before the payload do not let it through, and loading the model stops with the error."""
    marker = tmp_path / "ran"
    directory = model_dir(tmp_path)
    state = dict(torch_layouts(golden_weights))
    state["zz.hook"] = payloads(marker)["posix.system"]
    data_pkl, _ = tw.pickle_state_dict(state)
    tw.save(directory / "pytorch_model.bin", torch_layouts(golden_weights), data_pkl=data_pkl)
    with pytest.raises(MlxfamError, match="refusing forbidden global posix.system"):
        mlxfam.load(directory)
    assert not marker.exists()


# --- unsupported and broken files --------------------------------------------------------------


def small_checkpoint(path: Path):
    tw.save(path, {"w": tw.contiguous(np.arange(6, dtype=np.float32), "FloatStorage")})


def test_legacy_pickle_format_is_refused():
    with pytest.raises(MlxfamError, match=r"legacy_format\.bin: .*legacy non-zip torch\.save format .*unsupported"):
        torch_bin.load(REAL_TORCH / "legacy_format.bin")


def test_legacy_tar_format_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with tarfile.open(path, "w") as archive:
        for member in ("sys_info", "pickle", "storages", "tensors"):  # torch.save's layout before 0.4
            (tmp_path / member).write_bytes(b"\x80\x02N.")
            archive.add(tmp_path / member, arcname=member)
    with pytest.raises(MlxfamError, match=r"legacy tar format of torch\.save .*unsupported"):
        torch_bin.load(path)


def test_git_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(MlxfamError, match="Git LFS pointer, not the weights"):
        torch_bin.load(path)


def test_truncated_archive(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    small_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MlxfamError, match=r"pytorch_model\.bin: truncated or corrupt zip archive"):
        torch_bin.load(path)


def test_corrupt_pickle_fails_its_checksum(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    small_checkpoint(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"_rebuild_tensor_v2")
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MlxfamError, match=r"truncated or corrupt zip archive \(Bad CRC-32"):
        torch_bin.load(path)


def test_zip_that_is_not_a_torch_archive(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    tw.write_records(path, [("notes.txt", b"hello")])
    with pytest.raises(MlxfamError, match=r"not a torch\.save archive: it lacks pytorch_model/data\.pkl"):
        torch_bin.load(path)


def test_storage_record_shorter_than_its_elements(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    state = {"w": tw.contiguous(np.arange(6, dtype=np.float32), "FloatStorage")}
    data_pkl, _ = tw.pickle_state_dict(state)
    tw.write_records(path, [("data.pkl", data_pkl), ("data/0", b"\x00" * 12), ("version", b"3\n")])
    with pytest.raises(
        MlxfamError, match="pytorch_model/data/0 holds 12 bytes, but its 6 FloatStorage elements need 24"
    ):
        torch_bin.load(path)


def test_missing_storage_record(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    data_pkl, _ = tw.pickle_state_dict({"w": tw.contiguous(np.zeros(2, np.float32), "FloatStorage")})
    tw.write_records(path, [("data.pkl", data_pkl), ("version", b"3\n")])
    with pytest.raises(MlxfamError, match="refers to storage data/0, which the archive lacks"):
        torch_bin.load(path)


def test_view_past_the_end_of_its_storage(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    storage = tw.StorageData("FloatStorage", np.zeros(6, np.float32))
    tw.save(path, {"w": tw.TensorView(storage, 2, (2, 3), (3, 1))})
    with pytest.raises(MlxfamError, match=r"reaches past the end of storage data/0 \(6 elements\)"):
        torch_bin.load(path)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    data_pkl, _ = tw.pickle_state_dict({"w": tw.contiguous(np.zeros(2, np.float32), "FloatStorage"), "step": 3})
    tw.save(path, {"w": tw.contiguous(np.zeros(2, np.float32), "FloatStorage")}, data_pkl=data_pkl)
    with pytest.raises(MlxfamError, match="state dict entry 'step' is of type int, not a tensor"):
        torch_bin.load(path)


def test_unsupported_storage_type(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    tw.save(path, {"w": tw.contiguous(np.zeros(2, np.float64), "DoubleStorage")})
    with pytest.raises(
        MlxfamError,
        match=r"unsupported storage type torch\.DoubleStorage \(supported: FloatStorage, HalfStorage, BFloat16Storage",
    ):
        torch_bin.load(path)


# --- where the loader and the hub look for weights ----------------------------------------------


def test_safetensors_are_preferred_over_bin(tmp_path, golden):
    directory = model_dir(tmp_path)
    shutil.copy(GOLDEN / "model.safetensors", directory)
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    assert_matches_golden(directory, golden)


def test_bin_index_naming_a_missing_shard(tmp_path):
    directory = model_dir(tmp_path)
    index = {"weight_map": {"model.norm.weight": "pytorch_model-00002-of-00002.bin"}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(MlxfamError, match="shard.*not present: pytorch_model-00002-of-00002.bin"):
        mlxfam.load(directory)


def test_no_weights_names_both_formats(tmp_path):
    directory = model_dir(tmp_path)
    with pytest.raises(
        MlxfamError, match=r"no \*\.safetensors weights \(found: config\.json\), nor pytorch_model\*\.bin"
    ):
        mlxfam.load(directory)


def test_hub_fetches_bin_weights_only_for_repos_without_safetensors(tmp_path, monkeypatch):
    """Which files a download keeps, through huggingface_hub's own pattern filter."""
    repos = {
        "org/bin-only": [
            "config.json", "tokenizer.model", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "training_args.bin", "original/consolidated.00.pth",
        ],
        "org/both": ["config.json", "model.safetensors", "pytorch_model.bin"],
    }  # fmt: skip

    def snapshot_download(repo, allow_patterns, ignore_patterns, **options):
        folder = tmp_path / repo
        for name in filter_repo_objects(repos[repo], allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).touch()
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    kept = sorted(p.name for p in hub.snapshot("org/bin-only").rglob("*") if p.is_file())
    assert kept == sorted(repos["org/bin-only"][:5])
    kept = sorted(p.name for p in hub.snapshot("org/both").rglob("*") if p.is_file())
    assert kept == ["config.json", "model.safetensors"]
