"""mlxfam's own GGUF reader: the header, metadata and tensor table of a llama.cpp file, validated before any
tensor data is touched, and tensor data as zero-copy views of a memory map.

Written from the GGUF spec (ggml docs/gguf.md) and llama.cpp's reader (ggml/src/gguf.cpp), whose rejections
it follows: versions 2 and 3 are read (little-endian); version 1 (2023, 32-bit counts and lengths) is refused,
as llama.cpp refuses it. Every violation is an `MlxfamError` naming the file, the field or tensor and the
byte offset; no size declared in the file is allocated or looped over before the bytes it needs are known
to be there.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxfamError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) less the terminating NUL
MAX_ARRAY_NESTING = 8
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # values per block
    type_size: int  # bytes per block


# ggml's tensor types by id (ggml.h `enum ggml_type`); ids missing here were removed from ggml.
GGML_TYPES: dict[int, GGMLType] = {
    i: GGMLType(name, block, size)
    for i, name, block, size in (
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (9, "Q8_1", 32, 40),
        (10, "Q2_K", 256, 84),
        (11, "Q3_K", 256, 110),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
        (15, "Q8_K", 256, 292),
        (16, "IQ2_XXS", 256, 66),
        (17, "IQ2_XS", 256, 74),
        (18, "IQ3_XXS", 256, 98),
        (19, "IQ1_S", 256, 50),
        (20, "IQ4_NL", 32, 18),
        (21, "IQ3_S", 256, 110),
        (22, "IQ2_S", 256, 82),
        (23, "IQ4_XS", 256, 136),
        (24, "I8", 1, 1),
        (25, "I16", 1, 2),
        (26, "I32", 1, 4),
        (27, "I64", 1, 8),
        (28, "F64", 1, 8),
        (29, "IQ1_M", 256, 56),
        (30, "BF16", 1, 2),
        (34, "TQ1_0", 256, 54),
        (35, "TQ2_0", 256, 66),
        (39, "MXFP4", 32, 17),
        (40, "NVFP4", 64, 36),
        (41, "Q1_0", 128, 18),
    )
}
GGML_TYPE_IDS = {t.name: i for i, t in GGML_TYPES.items()}

# Element dtypes of the unblocked tensor types (BF16 as its bits: numpy has no bfloat16).
ELEMENT_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}

# GGUF metadata value types (gguf.h `enum gguf_type`): fixed-size ones by numpy dtype.
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9
_VALUE_DTYPES = {
    0: np.dtype("u1"),
    1: np.dtype("i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("u1"),  # bool
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
VALUE_TYPE_NAMES = {
    0: "UINT8",
    1: "INT8",
    2: "UINT16",
    3: "INT16",
    4: "UINT32",
    5: "INT32",
    6: "FLOAT32",
    7: "BOOL",
    8: "STRING",
    9: "ARRAY",
    10: "UINT64",
    11: "INT64",
    12: "FLOAT64",
}
# The fewest bytes one entry can take: a key (8-byte length, at least 1 byte), a type and a 1-byte value;
# a tensor info: a name (8-byte length, at least 1 byte), n_dims, one dimension, type and offset.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


def ggml_type_name(type_id: int) -> str:
    known = GGML_TYPES.get(type_id)
    return known.name if known else f"unknown type {type_id}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: ggml's ne reversed, so rows = ne[1] and ne[0] is the last axis
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> Python value: int/float/bool/str, numeric arrays as numpy
    arrays, string and nested arrays as lists), `tensors` (name -> TensorInfo, in file order) and
    `data(name)`, a read-only view of the tensor's bytes in the memory map."""

    def __init__(self, path: Path, version: int, metadata: dict, tensors: dict, alignment: int, buffer):
        self.path, self.version, self.metadata, self.tensors, self.alignment = (
            path,
            version,
            metadata,
            tensors,
            alignment,
        )
        self._buffer = buffer

    def data(self, name: str) -> np.ndarray:
        """Element types (F32, F16, BF16 as uint16, ints) as arrays of `shape`; block types as uint8 rows
        of `shape[:-1] + (bytes per row,)`."""
        info = self.tensors.get(name)
        if info is None:
            raise MlxfamError(f"{self.path}: no tensor {name!r} in this GGUF file")
        dtype = ELEMENT_DTYPES.get(info.type_name)
        if dtype is None:
            kind = GGML_TYPES[info.ggml_type]
            row_bytes = info.shape[-1] // kind.block_size * kind.type_size
            return np.frombuffer(self._buffer, np.uint8, info.nbytes, info.offset).reshape(*info.shape[:-1], row_bytes)
        return np.frombuffer(self._buffer, dtype, info.nbytes // dtype.itemsize, info.offset).reshape(info.shape)


class _Cursor:
    """Reads little-endian fields from the mapped file, checking each length against the bytes left."""

    def __init__(self, path: Path, buffer, size: int):
        self.path, self.buffer, self.size, self.pos = path, buffer, size, 0

    def fail(self, what: str, at: int | None = None):
        raise MlxfamError(f"{self.path}: {what} (at byte {self.pos if at is None else at})")

    def need(self, count: int, what: str, at: int | None = None):
        if count > self.size - self.pos:
            remain = self.size - self.pos
            self.fail(f"{what} needs {count} bytes but only {remain} remain: truncated or corrupt file", at)

    def unpack(self, fmt: str, what: str):
        self.need(struct.calcsize(fmt), what)
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self, what: str) -> str:
        start = self.pos
        length = self.unpack("<Q", f"length of {what}")
        self.need(length, what, start)
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8", start)

    def value(self, type_id: int, what: str, depth: int = 0):
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            return self.array(what, depth)
        dtype = _VALUE_DTYPES.get(type_id)
        if dtype is None:
            self.fail(f"{what} has unknown value type {type_id} (known: 0-12)")
        self.need(dtype.itemsize, what)
        value = np.frombuffer(self.buffer, dtype, 1, self.pos)[0].item()
        self.pos += dtype.itemsize
        return bool(value) if type_id == _BOOL else value

    def array(self, what: str, depth: int):
        start = self.pos
        element_type, count = self.unpack("<IQ", f"array header of {what}")
        if element_type == _STRING or element_type == _ARRAY:
            # Each string takes at least its 8-byte length, each nested array at least 12 header bytes.
            self.need(count * (8 if element_type == _STRING else 12), f"{count} elements of {what}", start)
            if element_type == _ARRAY and depth >= MAX_ARRAY_NESTING:
                self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING} levels", start)
            return [self.value(element_type, f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = _VALUE_DTYPES.get(element_type)
        if dtype is None:
            self.fail(f"{what} is an array of unknown value type {element_type} (known: 0-12)", start)
        self.need(count * dtype.itemsize, f"{count} elements of {what}", start)
        values = np.frombuffer(self.buffer, dtype, count, self.pos).copy()
        self.pos += count * dtype.itemsize
        return values != 0 if element_type == _BOOL else values


def read_gguf(path: str | Path) -> GGUFFile:
    """Parses and validates `path`; raises MlxfamError on anything malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 4 + 4 + 8 + 8:
                raise MlxfamError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes; at byte 0)")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise MlxfamError(f"{path}: cannot read GGUF file ({e})") from None
    cursor = _Cursor(path, buffer, size)
    version, n_tensors, n_kv = _read_header(cursor)
    metadata = _read_metadata(cursor, n_kv)
    alignment = _alignment(cursor, metadata)
    infos = _read_tensor_infos(cursor, n_tensors)
    tensors = _place_tensors(cursor, infos, alignment)
    return GGUFFile(path, version, metadata, tensors, alignment, buffer)


def _read_header(cursor: _Cursor) -> tuple[int, int, int]:
    magic = bytes(cursor.buffer[0:4])
    if magic != MAGIC:
        cursor.fail(f"not a GGUF file: magic {magic!r}, expected {MAGIC!r}")
    cursor.pos = 4
    version = cursor.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        detail = (
            "a big-endian file"
            if swapped in SUPPORTED_VERSIONS
            else "version 1 (32-bit counts, before August 2023): re-convert it with a current llama.cpp"
            if version == 1
            else "unknown version"
        )
        cursor.fail(f"GGUF version {version} is not supported ({detail}; supported: 2, 3)", 4)
    n_tensors = cursor.unpack("<Q", "tensor count")
    n_kv = cursor.unpack("<Q", "metadata count")
    remaining = cursor.size - cursor.pos
    if n_kv > remaining // _MIN_KV_BYTES:
        cursor.fail(f"metadata count n_kv {n_kv} cannot fit in the {remaining} bytes after the header", 16)
    if n_tensors > (remaining - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES:
        cursor.fail(f"tensor count n_tensors {n_tensors} cannot fit in the {remaining} bytes after the header", 8)
    return version, n_tensors, n_kv


def _read_metadata(cursor: _Cursor, n_kv: int) -> dict:
    metadata = {}
    for i in range(n_kv):
        start = cursor.pos
        key = cursor.string(f"metadata key {i}")
        if not key:
            cursor.fail(f"metadata key {i} is empty", start)
        if key in metadata:
            cursor.fail(f"duplicate metadata key {key!r}", start)
        type_id = cursor.unpack("<I", f"value type of metadata {key!r}")
        if type_id not in VALUE_TYPE_NAMES:
            cursor.fail(f"metadata {key!r} has unknown value type {type_id} (known: 0-12)", cursor.pos - 4)
        if key == ALIGNMENT_KEY and type_id != _UINT32:
            cursor.fail(f"metadata {key!r} must be UINT32, not {VALUE_TYPE_NAMES[type_id]}", cursor.pos - 4)
        metadata[key] = cursor.value(type_id, f"metadata {key!r}")
    return metadata


def _alignment(cursor: _Cursor, metadata: dict) -> int:
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        cursor.fail(f"metadata {ALIGNMENT_KEY!r} is {alignment}, not a power of two", 0)
    return alignment


def _read_tensor_infos(cursor: _Cursor, n_tensors: int) -> list[tuple[int, str, tuple[int, ...], int, int]]:
    """(info byte offset, name, ggml ne, type id, data offset) per tensor, names and types checked."""
    infos, names = [], set()
    for i in range(n_tensors):
        start = cursor.pos
        name = cursor.string(f"name of tensor {i}")
        where = f"tensor {name!r}"
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            cursor.fail(f"tensor {i} name {name!r} must be 1 to {MAX_NAME_BYTES} bytes", start)
        if name in names:
            cursor.fail(f"duplicate tensor name {name!r}", start)
        names.add(name)
        n_dims = cursor.unpack("<I", f"n_dims of {where}")
        if not 1 <= n_dims <= MAX_DIMS:
            cursor.fail(f"{where}: n_dims {n_dims} is not 1 to {MAX_DIMS}", cursor.pos - 4)
        ne = cursor.unpack(f"<{n_dims}Q", f"dimensions of {where}")
        ne = (ne,) if n_dims == 1 else tuple(ne)
        type_id = cursor.unpack("<I", f"type of {where}")
        offset = cursor.unpack("<Q", f"data offset of {where}")
        infos.append((start, name, ne, type_id, offset))
    return infos


def _place_tensors(cursor: _Cursor, infos: list, alignment: int) -> dict[str, TensorInfo]:
    """Checks each tensor's type, shape and byte range (aligned, inside the file, not overlapping another)
    and that the data section holds exactly the declared tensors."""
    data_start = cursor.pos + (-cursor.pos % alignment)
    tensors = {}
    for start, name, ne, type_id, offset in infos:
        where = f"tensor {name!r}"
        kind = GGML_TYPES.get(type_id)
        if kind is None:
            cursor.fail(f"{where}: unknown ggml type id {type_id}", start)
        elements = 1
        for dim in ne:
            if dim > INT64_MAX:
                cursor.fail(f"{where}: dimension {dim} is negative or too large (shape ne={list(ne)})", start)
            elements *= dim
        if elements > INT64_MAX:
            cursor.fail(f"{where}: {' x '.join(map(str, ne))} elements overflow int64", start)
        if ne[0] % kind.block_size:
            cursor.fail(
                f"{where}: ne[0]={ne[0]} is not a multiple of {kind.name}'s block size {kind.block_size}", start
            )
        nbytes = elements // kind.block_size * kind.type_size
        if offset % alignment:
            cursor.fail(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}", start)
        if offset > cursor.size - data_start or nbytes > cursor.size - data_start - offset:
            cursor.fail(
                f"{where}: data [{data_start + offset}, {data_start + offset + nbytes}) lies outside the "
                f"{cursor.size}-byte file",
                start,
            )
        tensors[name] = TensorInfo(name, type_id, tuple(reversed(ne)), data_start + offset, nbytes)
    placed = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
    for before, after in zip(placed, placed[1:]):
        if before.offset + before.nbytes > after.offset:
            cursor.fail(f"tensor {after.name!r} data overlaps tensor {before.name!r}", after.offset)
    data_end = max((t.offset + t.nbytes for t in placed), default=data_start)
    # Writers pad every tensor to the alignment, so a file ends within one alignment of its last tensor;
    # more bytes than that are tensors the header does not count (a tensor count one short).
    if cursor.size - data_end >= alignment:
        cursor.fail(
            f"{cursor.size - data_end} bytes after the last tensor's data: the tensor count "
            f"({len(infos)}) does not cover the file",
            data_end,
        )
    return tensors
