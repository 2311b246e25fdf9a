"""Custom kernels (installed as `mlxfam.kernels`) and the one seam that picks how they run.

Each kernel has a Metal source (`*.metal`, for `mx.fast.metal_kernel`), a CUDA source (`*.cu`, for
`mx.fast.cuda_kernel`) implementing the same algorithm line for line, and a pure-MLX reference that
is the fallback on every other backend and the oracle the kernels are tested against.

`backend()` answers which one runs: "metal" or "cuda" when MLX's default device is a GPU of that
kind, None (the reference) otherwise. `MLXFAM_KERNELS=reference` forces the reference everywhere;
`MLXFAM_KERNELS=kernel` makes a missing kernel backend an error instead of a silent fallback.
"""

from __future__ import annotations

import os
import re
from functools import cache
from importlib import resources

import mlx.core as mx

from ..errors import MlxfamError

KERNELS_ENV = "MLXFAM_KERNELS"
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)  # what every kernel takes and computes in
CHOICES = ("auto", "reference", "kernel")


def gpu_backend() -> str | None:
    """The GPU backend MLX computes on by default, if any: "metal" or "cuda"."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def backend(choice: str | None = None) -> str | None:
    """The kernel backend to use ("metal"/"cuda"), or None for the pure-MLX reference.

    `choice` (else $MLXFAM_KERNELS, else "auto"): "auto" uses a kernel where one can run,
    "reference" never does, "kernel" raises when none can run."""
    choice = choice or os.environ.get(KERNELS_ENV) or "auto"
    if choice not in CHOICES:
        raise MlxfamError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "reference":
        return None
    found = gpu_backend()
    if found is None and choice == "kernel":
        raise MlxfamError(
            f"kernels were asked for ({KERNELS_ENV}=kernel) but MLX's default device is "
            f"{mx.default_device()}, where neither the Metal nor the CUDA kernels run"
        )
    return found


@cache
def placeholder(dtype: mx.Dtype) -> mx.array:
    """A 1-element stand-in for a kernel input a call does not have (4-d, like the cache arrays):
    a kernel's inputs are fixed by name, and a kernel told so never reads it."""
    return mx.zeros((1, 1, 1, 1), dtype=dtype)


@cache
def source(name: str) -> str:
    """The text of kernel source file `name` (e.g. "attention.cu"), shipped inside the package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@cache
def sections(kind: str, *kernels: str) -> dict[str, str]:
    """The sources of `kernels` (e.g. "rope", "kv_write") for backend `kind` ("metal": `{kernel}.metal`,
    "cuda": `{kernel}.cu`) split on their `//@ <name>` lines: "header" (each file's helpers before its
    bodies, in the order given) and one body per kernel."""
    merged: dict[str, str] = {"header": ""}
    for kernel in kernels:
        text = source(f"{kernel}.metal" if kind == "metal" else f"{kernel}.cu")
        parts = re.split(r"^//@ (\w+)\n", text, flags=re.MULTILINE)
        for name, body in zip(parts[1::2], parts[2::2]):
            merged[name] = merged[name] + body if name == "header" else body
    return merged
