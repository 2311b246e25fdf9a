"""Split GGUF files (`name-00001-of-00003.gguf`): the yi golden re-split by gguf-py's own writer (llama.cpp's
`--split-max-tensors`) loads as the whole file does, and broken split sets are refused."""

from pathlib import Path

import gguf
import gguf_writer as gw
import mlx.core as mx
import numpy as np
import pytest
from gguf_writer import write_yi_gguf

import mlxfam
from mlxfam.errors import MlxfamError
from mlxfam.gguf_split import read_model_gguf

YI = Path(__file__).parents[1] / "data" / "golden" / "yi"


def resplit(source: Path, target: Path, max_tensors: int) -> list[Path]:
    """`source` rewritten by gguf-py's GGUFWriter as split parts of at most `max_tensors` tensors each."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(target.parent.glob(f"{target.stem}-*-of-*.gguf"))


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(np.asarray(ids).reshape(1, -1), dtype=mx.int32))[0])


def test_split_f32_gguf_gives_the_golden_logits(tmp_path):
    write_yi_gguf(tmp_path / "whole.gguf", gw.F32)
    parts = resplit(tmp_path / "whole.gguf", tmp_path / "yi.gguf", max_tensors=7)
    assert [p.name for p in parts] == [f"yi-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    model, _ = mlxfam.load(parts[0], dtype="float32")
    golden = np.load(YI / "golden.npz")
    np.testing.assert_allclose(logits(model, golden["input_ids"][0]), golden["prefill_logits"][0], atol=1e-4)


def test_split_quantized_gguf_equals_the_whole_file(tmp_path):
    write_yi_gguf(tmp_path / "whole.gguf", gw.Q8_0)
    parts = resplit(tmp_path / "whole.gguf", tmp_path / "yi.gguf", max_tensors=4)
    assert len(parts) > 2
    whole, _ = mlxfam.load(tmp_path / "whole.gguf")
    split, _ = mlxfam.load(parts[0])
    ids = np.load(YI / "golden.npz")["input_ids"][0]
    np.testing.assert_array_equal(logits(split, ids), logits(whole, ids))


TENSOR = (np.arange(32, dtype=np.float32).tobytes(), (1, 32), gw.F32)


def write_parts(tmp_path: Path, parts: list[tuple[dict, list[str]]], stem: str = "m") -> list[Path]:
    """Writes parts named as llama.cpp names them: each (metadata, tensor names) with F32 tensors."""
    paths = [tmp_path / f"{stem}-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    for path, (metadata, names) in zip(paths, parts, strict=True):
        gw.write(path, metadata, {name: TENSOR for name in names})
    return paths


def split_keys(number: int, count: int, tensors: int) -> dict:
    return {"split.no": number, "split.count": count, "split.tensors.count": tensors}


def test_valid_hand_written_split_merges_tensors(tmp_path):
    paths = write_parts(
        tmp_path,
        [({"general.architecture": "llama", **split_keys(0, 2, 3)}, ["a", "b"]), (split_keys(1, 2, 3), ["c"])],
    )
    merged = read_model_gguf(paths[0])
    assert list(merged.tensors) == ["a", "b", "c"]
    assert merged.metadata["general.architecture"] == "llama"
    np.testing.assert_array_equal(merged.data("c"), np.arange(32, dtype=np.float32).reshape(1, 32))


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([(split_keys(0, 2, 2), ["a"]), (split_keys(1, 2, 2), ["a"])], r"tensor 'a' is also in .*m-00001-of-00002"),
        ([(split_keys(0, 2, 2), ["a"]), (split_keys(0, 2, 2), ["b"])], r"part 2 of 2\): .*'split.no' is 0, expected 1"),
        ([(split_keys(0, 3, 2), ["a"]), (split_keys(1, 3, 2), ["b"])], r"'split.count' is 3, expected 2"),
        (
            [(split_keys(0, 2, 3), ["a"]), (split_keys(1, 2, 3), ["b"])],
            r"hold 2 tensors, but 'split.tensors.count' is 3",
        ),
        ([(split_keys(0, 2, 2), ["a"]), (split_keys(1, 2, 5), ["b"])], r"'split.tensors.count' is 5, but the first"),
        ([({}, ["a"]), (split_keys(1, 2, 2), ["b"])], r"part 1 of 2\): GGUF metadata 'split.count' is missing"),
    ],
    ids=["duplicate-tensor", "misnumbered", "wrong-count", "tensors-missing", "total-disagrees", "no-split-metadata"],
)
def test_broken_split_sets_are_refused(tmp_path, parts, message):
    paths = write_parts(tmp_path, parts)
    with pytest.raises(MlxfamError, match=message):
        read_model_gguf(paths[0])


def test_missing_part_is_named(tmp_path):
    paths = write_parts(tmp_path, [(split_keys(i, 3, 3), [f"t{i}"]) for i in range(3)])
    paths[1].unlink()
    with pytest.raises(
        MlxfamError, match=r"m-00001-of-00003.gguf: split GGUF part\(s\) missing: m-00002-of-00003.gguf"
    ):
        read_model_gguf(paths[0])


def test_a_later_part_is_refused_naming_the_first(tmp_path):
    paths = write_parts(tmp_path, [(split_keys(i, 2, 2), [f"t{i}"]) for i in range(2)])
    with pytest.raises(MlxfamError, match=r"is part 2 of a split GGUF: load its first part, .*m-00001-of-00002.gguf"):
        mlxfam.load(paths[1])


def test_renamed_part_is_refused(tmp_path):
    gw.write(tmp_path / "model.gguf", split_keys(0, 2, 2), {"a": TENSOR})
    with pytest.raises(MlxfamError, match=r"model.gguf: part of a split GGUF \('split.count' is 2\)"):
        read_model_gguf(tmp_path / "model.gguf")
