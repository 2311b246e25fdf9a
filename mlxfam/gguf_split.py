"""llama.cpp's split GGUF files (`name-00001-of-00003.gguf`, as `llama-gguf-split` and gguf-py write them) read
as one file.

Each part is a complete GGUF file with `split.no` (0-based), `split.count` and `split.tensors.count` (the total
over all parts) in its metadata; the first part carries the model's metadata, and each tensor lives in exactly
one part. Like llama.cpp, a split model is loaded from its first part, which names the others.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import MlxfamError
from .gguf_reader import GGUFFile, TensorInfo, read_gguf

SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf")
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"


def split_part_name(stem: str, number: int, count: int) -> str:
    """The file name of part `number` (1-based) of `count`, as llama.cpp names it."""
    return f"{stem}-{number:05d}-of-{count:05d}.gguf"


class SplitGGUF:
    """The parts of a split GGUF as one file: the first part's `path` and `metadata`, every part's `tensors`
    (in part order) and `data(name)` from the part that holds the tensor."""

    def __init__(self, parts: list[GGUFFile]):
        self.parts = parts
        self.path, self.metadata = parts[0].path, parts[0].metadata
        self._part_of = {name: part for part in parts for name in part.tensors}
        self.tensors: dict[str, TensorInfo] = {name: part.tensors[name] for name, part in self._part_of.items()}

    def data(self, name: str) -> np.ndarray:
        part = self._part_of.get(name)
        if part is None:
            raise MlxfamError(f"{self.path}: no tensor {name!r} in this split GGUF")
        return part.data(name)


def _split_int(gguf_file: GGUFFile, key: str) -> int | str:
    """The integer `key` of the file's metadata, else "missing"."""
    value = gguf_file.metadata.get(key)
    if value is None:
        return "missing"
    if isinstance(value, bool) or not isinstance(value, int):
        raise MlxfamError(f"{gguf_file.path}: GGUF metadata {key!r} must be an integer, got {value!r}")
    return value


def read_split(parts: list[Path]) -> SplitGGUF:
    """Reads every part (in order) and checks their split metadata against each other and the file names."""
    files = [read_gguf(path) for path in parts]
    count = len(files)
    expected_total = _split_int(files[0], SPLIT_TENSORS_COUNT)
    seen: dict[str, Path] = {}
    for index, gguf_file in enumerate(files):
        where = f"{gguf_file.path} (part {index + 1} of {count})"
        number, declared_count = _split_int(gguf_file, SPLIT_NO), _split_int(gguf_file, SPLIT_COUNT)
        if declared_count != count:
            raise MlxfamError(f"{where}: GGUF metadata '{SPLIT_COUNT}' is {declared_count}, expected {count}")
        if number != index:
            raise MlxfamError(f"{where}: GGUF metadata '{SPLIT_NO}' is {number}, expected {index} (0-based)")
        total = _split_int(gguf_file, SPLIT_TENSORS_COUNT)
        if total != expected_total:
            raise MlxfamError(
                f"{where}: GGUF metadata '{SPLIT_TENSORS_COUNT}' is {total}, but the first part says {expected_total}"
            )
        for name in gguf_file.tensors:
            if name in seen:
                raise MlxfamError(f"{where}: tensor {name!r} is also in {seen[name]}")
            seen[name] = gguf_file.path
    if len(seen) != expected_total:
        raise MlxfamError(
            f"{files[0].path}: the {count} parts hold {len(seen)} tensors, but '{SPLIT_TENSORS_COUNT}' is "
            f"{expected_total}"
        )
    return SplitGGUF(files)


def split_parts(path: Path) -> list[Path] | None:
    """All parts of the split GGUF whose first part is `path` (each must be there); None when the file name is
    not a part's. Any part but the first is refused, as llama.cpp refuses it."""
    match = SPLIT_NAME.fullmatch(path.name)
    if match is None:
        return None
    number, count = int(match["number"]), int(match["count"])
    if count == 1:
        return None  # a whole model, whatever its name
    if not 1 <= number <= count:
        raise MlxfamError(f"{path}: part number {number} of {count} in the file name is out of range")
    first = path.with_name(split_part_name(match["stem"], 1, count))
    if number != 1:
        raise MlxfamError(f"{path} is part {number} of a split GGUF: load its first part, {first}")
    parts = [path.with_name(split_part_name(match["stem"], i, count)) for i in range(1, count + 1)]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise MlxfamError(f"{path}: split GGUF part(s) missing: {', '.join(missing)}")
    return parts


def read_model_gguf(path: Path) -> GGUFFile | SplitGGUF:
    """A GGUF file, or all parts of a split one given its first part."""
    parts = split_parts(Path(path))
    if parts is not None:
        return read_split(parts)
    gguf_file = read_gguf(path)
    count = _split_int(gguf_file, SPLIT_COUNT)
    if count not in ("missing", 1):
        raise MlxfamError(
            f"{path}: part of a split GGUF ('{SPLIT_COUNT}' is {count}), but its name does not say which part "
            f"(llama.cpp names them NAME-00001-of-{count:05d}.gguf)"
        )
    return gguf_file
