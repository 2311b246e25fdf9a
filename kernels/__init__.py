"""Custom kernels (installed as `mlxfam.kernels`) and the one seam that picks how they run.

Each kernel has one source text (`*.inc`) for both `mx.fast.metal_kernel` and `mx.fast.cuda_kernel`,
after a per-platform prelude (`prelude.metal`, `prelude.cu`: thread indices, simdgroup/warp
shuffles, barriers, shared memory and math under the same names), and a pure-MLX reference that is
the fallback on every other backend and the oracle the kernels are tested against.

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
    """The text of kernel source file `name` (e.g. "attention.inc"), shipped inside the package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def split_sections(name: str) -> dict[str, str]:
    """Source file `name` split on its `//@ <section>` lines (what precedes the first is its comment)."""
    parts = re.split(r"^//@ (\w+)\n", source(name), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def prelude(kind: str) -> dict[str, str]:
    """Backend `kind`'s prelude ("metal": prelude.metal, "cuda": prelude.cu): its "header" (the
    platform's helpers) and "indices" (the thread indices every kernel body starts with)."""
    return split_sections("prelude.metal" if kind == "metal" else "prelude.cu")


@cache
def sections(kind: str, *kernels: str) -> dict[str, str]:
    """The sources of `kernels` (e.g. "rope", "kv_write": rope.inc, kv_write.inc) for backend `kind`
    ("metal" or "cuda"): "header" (the prelude's helpers, then each file's, in the order given) and
    one body per kernel section, each after the prelude's thread indices."""
    platform = prelude(kind)
    merged = {"header": platform["header"]}
    for kernel in kernels:
        for name, text in split_sections(f"{kernel}.inc").items():
            if name == "header":
                merged["header"] += text
            else:
                merged[name] = platform["indices"] + text
    return merged
