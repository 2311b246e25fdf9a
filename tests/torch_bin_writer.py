"""Writes checkpoints in the zip format of `torch.save` (PyTorch >= 1.6) without torch, for the tests.

The layout follows torch's writer (torch/serialization.py `_save`, caffe2 `PyTorchStreamWriter`):
records `<archive>/data.pkl` (protocol 2 pickle; tensors reduce to torch._utils._rebuild_tensor_v2
and storages are persistent ids `('storage', torch.<Type>Storage, key, 'cpu', numel)`),
`<archive>/byteorder`, `<archive>/data/<key>` and `<archive>/version`, all stored uncompressed with
each record's data 64-byte aligned by an `FB` padding extra field; `<archive>` is the file's stem.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGNMENT = 64
FORMAT_VERSION = b"3\n"  # what torch.save writes


@dataclass(eq=False)  # compared by identity: tensors that share a storage hold the same object
class StorageData:
    type_name: str  # torch storage class, e.g. "FloatStorage"
    data: np.ndarray  # 1-D, the storage's elements (bfloat16 as its raw uint16 bits)


@dataclass(eq=False)
class TensorView:
    storage: StorageData
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements, as torch counts them


@dataclass(eq=False)
class Parameter:
    """An nn.Parameter (what `state_dict(keep_vars=True)` holds): torch._utils._rebuild_parameter."""

    tensor: TensorView


def contiguous(array: np.ndarray, type_name: str) -> TensorView:
    """A tensor that owns its storage, row-major."""
    strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
    return TensorView(StorageData(type_name, np.ascontiguousarray(array).reshape(-1)), 0, array.shape, strides)


@dataclass(frozen=True)
class Global:
    """A module-level name the pickle refers to (GLOBAL opcode), without importing it."""

    module: str
    name: str

    def __call__(self, *args):  # pickle reduces only to callables; this one stands for torch's and never runs
        raise TypeError(f"{self.module}.{self.name} is only a name here")


REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can learn `Global`
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storage_keys: dict[int, str] = {}
        self.storages: list[StorageData] = []
        self.storage_types: dict[str, Global] = {}  # one object per name, so repeats are memo references

    def save_global_name(self, obj: Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_global_name

    def persistent_id(self, obj):
        if not isinstance(obj, StorageData):
            return None
        key = self.storage_keys.get(id(obj))
        if key is None:
            key = self.storage_keys[id(obj)] = str(len(self.storages))
            self.storages.append(obj)
        return (
            "storage",
            self.storage_types.setdefault(obj.type_name, Global("torch", obj.type_name)),
            key,
            "cpu",
            obj.data.size,
        )

    def reducer_override(self, obj):
        if isinstance(obj, Parameter):
            return REBUILD_PARAMETER, (obj.tensor, False, OrderedDict())
        if isinstance(obj, TensorView):
            args = (obj.storage, obj.offset, tuple(obj.shape), tuple(obj.strides), False, OrderedDict())
            return REBUILD_TENSOR, args
        return NotImplemented


def pickle_state_dict(state_dict) -> tuple[bytes, list[StorageData]]:
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer)
    pickler.dump(state_dict)
    return buffer.getvalue(), pickler.storages


def write_records(path: Path, records: list[tuple[str, bytes]], archive: str | None = None):
    """A zip of `<archive>/<name>` records, stored, each one's data starting on a 64-byte boundary."""
    archive = archive or Path(path).stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # local header (30 bytes) + name + the 4-byte "FB" extra header, then padding to the boundary
            unpadded = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
            padding = -unpadded % ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            zf.writestr(info, data)


def save(path: Path, state_dict, byteorder: str = "little", data_pkl: bytes | None = None):
    """torch.save(state_dict, path) for a dict of TensorView; `data_pkl` replaces the pickle as given."""
    pickled, storages = pickle_state_dict(state_dict)
    element_order = "<" if byteorder == "little" else ">"
    records = [("data.pkl", pickled if data_pkl is None else data_pkl), ("byteorder", byteorder.encode())]
    for key, storage in enumerate(storages):
        data = storage.data.astype(storage.data.dtype.newbyteorder(element_order))
        records.append((f"data/{key}", data.tobytes()))
    records.append(("version", FORMAT_VERSION))
    write_records(path, records)
