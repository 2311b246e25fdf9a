"""Legacy PyTorch `.bin` checkpoints, read without torch and without running any code from the file.

`torch.save` (PyTorch >= 1.6) writes a zip archive whose records all sit in one folder:
`<archive>/data.pkl` is the pickled state dict, in which every tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every storage a persistent
id `('storage', torch.<Type>Storage, key, location, numel)`; the storage bytes are the records
`<archive>/data/<key>` (stored uncompressed, 64-byte aligned); `byteorder` says "little" or "big"
and `version` (or `.data/version`) the format version.

The pickle is read by an unpickler that resolves only those few globals, each to a function of
ours that merely records the tensor's layout: any other global (`os.system`, `builtins.eval`, ...)
is refused when the unpickler meets it, before it could be called. Storages are memory-mapped, so
each tensor is copied once, straight from the file into its MLX array.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .errors import MlxfamError

# torch storage class -> (element type as stored in the file, MLX dtype). numpy has no bfloat16,
# so its 16 bits are read as uint16 and the MLX array is reinterpreted.
STORAGE_TYPES = {
    "FloatStorage": (np.dtype(np.float32), mx.float32),
    "HalfStorage": (np.dtype(np.float16), mx.float16),
    "BFloat16Storage": (np.dtype(np.uint16), mx.bfloat16),
    "LongStorage": (np.dtype(np.int64), mx.int64),
    "IntStorage": (np.dtype(np.int32), mx.int32),
    "ShortStorage": (np.dtype(np.int16), mx.int16),
    "CharStorage": (np.dtype(np.int8), mx.int8),
    "ByteStorage": (np.dtype(np.uint8), mx.uint8),
    "BoolStorage": (np.dtype(np.bool_), mx.bool_),
}

ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


# Immutable tuples: the pickle's BUILD opcode cannot alter them after they were checked.
class StorageType(NamedTuple):
    """What `torch.<name>` resolves to: only the element type."""

    name: str


class Storage(NamedTuple):
    """One `data/<key>` record: `numel` elements of a storage type."""

    key: str
    type: StorageType
    numel: int


class TensorLayout(NamedTuple):
    """A tensor as `_rebuild_tensor_v2` describes it: a strided view (in elements) into a storage."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(n) is int and n >= 0 for n in value):
        raise ValueError(f"tensor {what} {value!r} is not a sequence of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2; gradient flags and hooks are training state."""
    if not isinstance(storage, Storage):
        raise ValueError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if metadata:
        raise ValueError(f"unsupported tensor metadata {metadata!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or type(offset) is not int or offset < 0:
        raise ValueError(f"tensor layout offset {offset!r}, size {shape}, stride {strides} is inconsistent")
    if math.prod(shape) and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= storage.numel:
        raise ValueError(
            f"tensor (offset {offset}, size {shape}, stride {strides}) reaches past the end of "
            f"storage data/{storage.key} ({storage.numel} elements)"
        )
    return TensorLayout(storage, offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stands in for torch._utils._rebuild_parameter: an nn.Parameter is its tensor here."""
    if not isinstance(data, TensorLayout):
        raise ValueError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_TYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source
        self.storages: dict[str, Storage] = {}

    def find_class(self, module, name):
        # Every global the pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT) passes through here.
        # Protocols < 3 may spell Python 3 names the Python 2 way; name what would have been called.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None and module == "torch" and name.endswith("Storage"):
            raise MlxfamError(
                f"{self.source}: unsupported storage type torch.{name} (supported: {', '.join(STORAGE_TYPES)})"
            )
        if allowed is None:
            raise MlxfamError(
                f"{self.source}: refusing forbidden global {module}.{name}: a weights file needs only tensors, "
                "storages and containers (nothing from the file was executed)"
            )
        return allowed

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ValueError(f"malformed storage id {pid!r:.100}")
        storage = self.storages.setdefault(key, Storage(key, storage_type, numel))
        if storage != Storage(key, storage_type, numel):
            raise ValueError(f"storage data/{key} is named both as {storage} and as {pid!r}")
        return storage


def _refuse_non_zip(path: Path, head: bytes):
    """Name the format of a file that is not a torch zip archive."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return
    if not head:
        reason = "the file is empty"
    elif head.startswith(b"version https://git-lfs"):
        reason = "it is a Git LFS pointer, not the weights (fetch the LFS object, e.g. `git lfs pull`)"
    elif head[257:262] == b"ustar":
        reason = "it is the legacy tar format of torch.save (PyTorch < 0.4), which is unsupported"
    elif head.startswith(b"\x80"):
        reason = (
            "it is the legacy non-zip torch.save format (a bare pickle stream: PyTorch < 1.6 or "
            "_use_new_zipfile_serialization=False), which is unsupported; re-save it with a recent torch.save "
            "or convert it to safetensors"
        )
    else:
        reason = f"it is not a torch.save zip archive (starts with {head[:8]!r})"
    raise MlxfamError(f"{path}: cannot read PyTorch weights: {reason}")


def _records(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by their name inside its one folder (which torch names after the file)."""
    names = archive.namelist()
    folder = names[0].partition("/")[0] + "/" if names else ""
    if folder == "/" or not all(name.startswith(folder) for name in names):
        raise MlxfamError(f"{path}: not a torch.save archive: its records do not share one folder")
    records = {info.filename[len(folder) :]: info for info in archive.infolist()}
    if "constants.pkl" in records:
        raise MlxfamError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save state dict; unsupported")
    version = records.get(".data/version") or records.get("version")
    if "data.pkl" not in records or version is None:
        raise MlxfamError(f"{path}: not a torch.save archive: it lacks {folder}data.pkl or {folder}version")
    number = archive.read(version).strip()
    if not number.isdigit():
        raise MlxfamError(f"{path}: {version.filename} record {number[:20]!r} is not a format version number")
    return records


def _byteorder(path: Path, archive: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo]) -> str:
    # Older archives lack the record; torch then assumes the reading machine's order, which for the
    # files in circulation (x86, ARM) is little-endian.
    order = archive.read(records["byteorder"]).decode("ascii", "replace") if "byteorder" in records else "little"
    if order not in ("little", "big"):
        raise MlxfamError(f"{path}: byteorder record is {order[:20]!r}, expected 'little' or 'big'")
    return "<" if order == "little" else ">"


def _unpickle_state_dict(path: Path, data: bytes) -> tuple[dict[str, TensorLayout], dict[str, Storage]]:
    unpickler = _StateDictUnpickler(data, source=f"{path}: data.pkl")
    try:
        state_dict = unpickler.load()
    except MlxfamError:
        raise
    except Exception as error:  # untrusted bytes: any malformation is a corrupt file
        raise MlxfamError(f"{path}: corrupt data.pkl ({type(error).__name__}: {error})") from None
    if not isinstance(state_dict, dict):
        raise MlxfamError(f"{path}: data.pkl holds type {type(state_dict).__name__}, not a state dict of tensors")
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, TensorLayout):
            raise MlxfamError(f"{path}: state dict entry {name!r} is of type {type(value).__name__}, not a tensor")
    return state_dict, unpickler.storages


def _storage_array(
    path: Path, archive: zipfile.ZipFile, mapped: np.ndarray, info: zipfile.ZipInfo, storage: Storage, order: str
) -> np.ndarray:
    """The storage's elements: a view of the mapped file when stored uncompressed (as torch writes them)."""
    dtype = STORAGE_TYPES[storage.type.name][0].newbyteorder(order)
    nbytes = storage.numel * dtype.itemsize
    if info.file_size < nbytes:
        raise MlxfamError(
            f"{path}: record {info.filename} holds {info.file_size} bytes, but its {storage.numel} "
            f"{storage.type.name} elements need {nbytes}"
        )
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(archive.read(info), dtype=dtype, count=storage.numel)
    header = bytes(mapped[info.header_offset : info.header_offset + ZIP_LOCAL_HEADER.size])
    if len(header) < ZIP_LOCAL_HEADER.size or not header.startswith(b"PK\x03\x04"):
        raise MlxfamError(f"{path}: corrupt zip archive: bad local header for {info.filename}")
    _, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(header)
    start = info.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length
    if start + nbytes > mapped.size:
        raise MlxfamError(f"{path}: truncated: record {info.filename} reaches past the end of the file")
    return mapped[start : start + nbytes].view(dtype)


def _to_mlx(layout: TensorLayout, storage: np.ndarray) -> mx.array:
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[layout.offset :], layout.shape, [s * itemsize for s in layout.strides], writeable=False
    )
    if not view.dtype.isnative:
        view = view.astype(view.dtype.newbyteorder("="))
    array = mx.array(view)  # copies, following the strides: views and shared storages come out as their own arrays
    mlx_dtype = STORAGE_TYPES[layout.storage.type.name][1]
    return array if array.dtype == mlx_dtype else array.view(mlx_dtype)


def load(path: Path) -> dict[str, mx.array]:
    """The tensors of one torch.save checkpoint (a state dict such as pytorch_model.bin) by name."""
    path = Path(path)
    with open(path, "rb") as file:
        _refuse_non_zip(path, file.read(512))
    try:
        with zipfile.ZipFile(path) as archive:
            records = _records(path, archive)
            order = _byteorder(path, archive, records)
            state_dict, storages = _unpickle_state_dict(path, archive.read(records["data.pkl"]))
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
            arrays = {}
            for key, storage in storages.items():
                info = records.get(f"data/{key}")
                if info is None:
                    raise MlxfamError(f"{path}: data.pkl refers to storage data/{key}, which the archive lacks")
                arrays[key] = _storage_array(path, archive, mapped, info, storage, order)
            return {name: _to_mlx(layout, arrays[layout.storage.key]) for name, layout in state_dict.items()}
    except zipfile.BadZipFile as error:
        raise MlxfamError(f"{path}: truncated or corrupt zip archive ({error})") from None
