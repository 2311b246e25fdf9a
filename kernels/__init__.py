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
# The quantized KV cache's packings (its layout: `mlxfam.cache`), each of which the kernels are built for.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64)
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
def sections(kernel: str, kind: str) -> dict[str, str]:
    """Kernel `kernel`'s source for backend `kind` ("metal": `{kernel}.metal`, "cuda": `{kernel}.cu`)
    split on its `//@ <name>` lines: "header" (helpers before the bodies) and one body per kernel."""
    text = source(f"{kernel}.metal" if kind == "metal" else f"{kernel}.cu")
    parts = re.split(r"^//@ (\w+)\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))
