"""Rotary position embedding: Metal and CUDA kernels, their pure-MLX reference, and the seam between them.

Every rotary variant mlxfam's families use is one computation over a precomputed table:
`cos`/`sin` of positions x inverse frequencies (`rope_table`), float32, shaped (B or 1, L, R/2),
or (2, B or 1, L, R/2) for ChatGLM-6B's 2D rotary (two position streams). Each scaling (linear,
dynamic NTK, llama3, yarn, GGUF frequency factors) is a different inverse-frequency table; yarn's
attention factor is `rope_table(..., scale=)`; a table built elsewhere (ChatGLM2's fp16 one) is
passed as is. Per-batch-row offsets are positions `offsets[:, None] + arange(L)`.

The rotation, on (B, H, L, D) tensors with `rotary_dims` R:
- half-split pairing (HF rotate_half): dims (i, i + R/2) turn together by frequency i;
- interleaved pairing: dims (2i, 2i + 1) turn together by frequency i;
- dims R..D-1 pass through (partial rotary);
- 2D (`two_d`): each head is two halves of D/2, the first turned by stream 0, the second by
  stream 1, the pairing and R applying within each half.
The math is fp32 and the result is in the input's dtype.

`rope_qk` turns q and k in one launch. The cache write of a quantizing cache, which may rotate its
keys by these tables too, is `mlxfam.kernels.kv_write`; it launches through this module's machinery.

Which implementation runs is `mlxfam.kernels.backend(choice)`: the Metal or CUDA kernel when MLX
computes on such a GPU and `kernel_unsupported` has no objection, else the reference (composed of
MLX ops: `mx.fast.rope` has no 2D rotary, per-row offsets or tables). `choice="reference"` forces
the reference; `choice="kernel"` insists on the kernel and raises MlxfamError where it cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from ..errors import MlxfamError
from . import FLOAT_DTYPES, backend, sections

THREADGROUP = 256  # threads; a multiple of 32 so that the cache write's quantization groups are whole simdgroups/warps
MAX_THREADS = 2**31 - 1  # MLX's grid sizes are ints

Tables = tuple[mx.array, mx.array]


def rope_table(positions, inv_freq, *, scale: float = 1.0) -> Tables:
    """cos and sin (float32) of `positions` x `inv_freq`, times `scale` (yarn's attention factor).

    positions: (B or 1, L), or (2, B or 1, L) for 2D rotary; inv_freq: (R/2,).
    Returns two arrays of shape positions.shape + (R/2,)."""
    # float32 straight from numpy: a float64 array could not be used on a GPU.
    positions, inv_freq = (
        a if isinstance(a, mx.array) else mx.array(a, dtype=mx.float32) for a in (positions, inv_freq)
    )
    if positions.ndim not in (2, 3) or (positions.ndim == 3 and positions.shape[0] != 2):
        raise MlxfamError(
            f"rope positions have shape {tuple(positions.shape)}; expected (batch or 1, length), "
            "or (2, batch or 1, length) for 2D rotary"
        )
    if inv_freq.ndim != 1:
        raise MlxfamError(f"inverse frequencies have shape {tuple(inv_freq.shape)}; expected (rotary_dims / 2,)")
    angles = positions.astype(mx.float32)[..., None] * inv_freq.astype(mx.float32)
    return mx.cos(angles) * scale, mx.sin(angles) * scale


# --- checks shared by the kernels and the reference ---------------------------------------------


def check_tensor(name: str, x: mx.array) -> None:
    if x.ndim != 4:
        raise MlxfamError(f"{name} has shape {tuple(x.shape)}; expected (batch, heads, length, head_dim)")
    if x.dtype not in FLOAT_DTYPES:
        raise MlxfamError(f"{name} is {x.dtype}; rope takes float16, bfloat16 or float32")


def checked_tables(x: mx.array, cos: mx.array, sin: mx.array, rotary_dims: int, two_d: bool) -> Tables:
    """cos/sin checked against x (B, H, L, D) and shaped as the kernels index them: float32,
    (streams, B or 1, L, R/2), row-contiguous."""
    batch, _, length, head_dim = x.shape
    streams = 2 if two_d else 1
    if not isinstance(rotary_dims, int) or rotary_dims <= 0 or rotary_dims % 2:
        raise MlxfamError(f"rotary_dims must be a positive even number, got {rotary_dims!r}")
    if head_dim % streams or rotary_dims > head_dim // streams:
        where = "each half of a head (2D rotary)" if two_d else "a head"
        raise MlxfamError(f"rotary_dims {rotary_dims} does not fit in {where} of head_dim {head_dim}")
    expected = (2,) * two_d + (batch, length, rotary_dims // 2)
    if cos.shape != sin.shape:
        raise MlxfamError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} tables differ in shape")
    if (
        cos.ndim != len(expected)
        or (two_d and cos.shape[0] != 2)
        or cos.shape[-2:] != expected[-2:]
        or (cos.shape[-3] not in (1, batch))
    ):
        raise MlxfamError(
            f"cos/sin tables have shape {tuple(cos.shape)}; expected {expected} (or batch 1, shared by all rows)"
        )
    table_shape = (streams, *cos.shape[-3:])
    return tuple(mx.contiguous(t.astype(mx.float32).reshape(table_shape)) for t in (cos, sin))


def _checked_rope(x: mx.array, cos: mx.array, sin: mx.array, rotary_dims: int, two_d: bool) -> Tables:
    check_tensor("x", x)
    return checked_tables(x, cos, sin, rotary_dims, two_d)


def _checked_qk(q: mx.array, k: mx.array, cos: mx.array, sin: mx.array, rotary_dims: int, two_d: bool) -> Tables:
    check_tensor("q", q)
    check_tensor("k", k)
    # Turned at the same positions by the same tables, and written by one launch of one dtype.
    if (q.shape[0], q.shape[2], q.shape[3], q.dtype) != (k.shape[0], k.shape[2], k.shape[3], k.dtype):
        raise MlxfamError(
            f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} differ in batch, length, head_dim or dtype"
        )
    return checked_tables(q, cos, sin, rotary_dims, two_d)


# --- pure-MLX reference ----------------------------------------------------------------------------


def rotated_reference(x: mx.array, cos: mx.array, sin: mx.array, rotary_dims: int, interleaved: bool) -> mx.array:
    """x (B, H, L, D) rotated by checked tables (streams, B or 1, L, R/2)."""
    batch, heads, length, head_dim = x.shape
    streams = cos.shape[0]
    parts = x.astype(mx.float32).reshape(batch, heads, length, streams, head_dim // streams)
    # (B or 1, 1, L, streams, R/2): stream s turns part s of every head.
    cos, sin = (t.transpose(1, 2, 0, 3)[:, None] for t in (cos, sin))
    turning, passing = parts[..., :rotary_dims], parts[..., rotary_dims:]
    if interleaved:
        a, b = turning[..., 0::2], turning[..., 1::2]
        turned = mx.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(turning.shape)
    else:
        a, b = turning[..., : rotary_dims // 2], turning[..., rotary_dims // 2 :]
        turned = mx.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return mx.concatenate([turned, passing], axis=-1).reshape(x.shape).astype(x.dtype)


# --- kernels ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCall:
    """One launch as MLX sees it, without the arrays: which section of which source files runs
    (`mlxfam.kernels.sections`), the dtypes of its named inputs and outputs, and its template arguments."""

    kernel: str
    inputs: tuple[tuple[str, mx.Dtype], ...]
    outputs: tuple[tuple[str, mx.Dtype], ...]
    template: tuple[tuple[str, object], ...]
    sources: tuple[str, ...] = ("rope",)

    @property
    def name(self) -> str:
        """The kernel's name for MLX (which prefixes it and appends the template arguments)."""
        return f"mlxfam_{self.kernel}"


TABLE_INPUTS = (("cos_table", mx.float32), ("sin_table", mx.float32))


def _rope_call(dtype: mx.Dtype, interleaved: bool) -> KernelCall:
    return KernelCall(
        "rope", (("x", dtype), *TABLE_INPUTS), (("out", dtype),), (("T", dtype), ("INTERLEAVED", interleaved))
    )


def _rope_qk_call(dtype: mx.Dtype, interleaved: bool) -> KernelCall:
    return KernelCall(
        "rope_qk",
        (("q", dtype), ("k", dtype), *TABLE_INPUTS),
        (("q_out", dtype), ("k_out", dtype)),
        (("T", dtype), ("INTERLEAVED", interleaved)),
    )


def kernel_calls() -> list[KernelCall]:
    """Every launch the launchers can request: each dtype and pairing; runtime sizes come from the
    inputs' shapes, not from templates."""
    return [
        call(dtype, interleaved)
        for dtype in FLOAT_DTYPES
        for interleaved in (False, True)
        for call in (_rope_call, _rope_qk_call)
    ]


@cache
def _kernel(
    kind: str,
    sources: tuple[str, ...],
    name: str,
    body: str,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
):
    """The MLX kernel object (built once: MLX compiles each instantiation on its first launch)."""
    parts = sections(kind, *sources)
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=parts[body],
        header=parts["header"],
        ensure_row_contiguous=False,  # the tensors are read through their strides; the tables are made contiguous
    )


def launch(kind: str, call: KernelCall, inputs: list[mx.array], output_shapes: list, threads: int) -> list[mx.array]:
    """Runs `call` on `inputs` over `threads` threads, in blocks of THREADGROUP."""
    input_names, output_names = (tuple(name for name, _ in args) for args in (call.inputs, call.outputs))
    return _kernel(kind, call.sources, call.name, call.kernel, input_names, output_names)(
        inputs=inputs,
        template=list(call.template),
        grid=(threads, 1, 1),
        threadgroup=(THREADGROUP, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=[dtype for _, dtype in call.outputs],
    )


def kernel_unsupported(threads: int) -> str | None:
    """Why a launch of `threads` threads (the size of the call) cannot run as a kernel, or None."""
    if threads == 0:
        return "nothing to compute"
    if threads > MAX_THREADS:
        return f"{threads} threads, more than one launch grid holds ({MAX_THREADS})"
    return None


def chosen(kernel: str, choice: str | None, threads: int) -> str | None:
    """The kernel backend that takes the call, or None for the reference; with choice "kernel",
    an MlxfamError saying why the `kernel` kernel cannot."""
    kind = backend(choice)
    reason = None if kind is None else kernel_unsupported(threads)
    if choice == "kernel" and reason is not None:
        raise MlxfamError(f"the {kernel} kernel cannot take this call: {reason}")
    return kind if reason is None else None


def _rope_launch(kind: str, x: mx.array, tables: Tables, interleaved: bool) -> mx.array:
    (out,) = launch(kind, _rope_call(x.dtype, interleaved), [x, *tables], [x.shape], x.size)
    return out


def _rope_qk_launch(
    kind: str, q: mx.array, k: mx.array, tables: Tables, interleaved: bool
) -> tuple[mx.array, mx.array]:
    call = _rope_qk_call(q.dtype, interleaved)
    q_out, k_out = launch(kind, call, [q, k, *tables], [q.shape, k.shape], q.size + k.size)
    return q_out, k_out


# --- the two operations, each by dispatch, by kernel and by reference -----------------------------------


def rope(
    x: mx.array,
    cos: mx.array,
    sin: mx.array,
    *,
    rotary_dims: int,
    interleaved: bool,
    two_d: bool = False,
    choice: str | None = None,
) -> mx.array:
    """x (B, H, L, D) rotated by the cos/sin tables of `rope_table` ((B or 1, L, R/2), or
    (2, B or 1, L, R/2) with `two_d`), by the kernel of `mlxfam.kernels.backend(choice)` where one
    runs and takes the call (`kernel_unsupported`), else by the reference (module docstring)."""
    tables = _checked_rope(x, cos, sin, rotary_dims, two_d)
    kind = chosen("rope", choice, x.size)
    if kind is None:
        return rotated_reference(x, *tables, rotary_dims, interleaved)
    return _rope_launch(kind, x, tables, interleaved)


def rope_qk(
    q: mx.array,
    k: mx.array,
    cos: mx.array,
    sin: mx.array,
    *,
    rotary_dims: int,
    interleaved: bool,
    two_d: bool = False,
    choice: str | None = None,
) -> tuple[mx.array, mx.array]:
    """q (B, Hq, L, D) and k (B, Hk, L, D) rotated in one launch (see `rope`)."""
    tables = _checked_qk(q, k, cos, sin, rotary_dims, two_d)
    kind = chosen("rope", choice, q.size + k.size)
    if kind is None:
        return tuple(rotated_reference(x, *tables, rotary_dims, interleaved) for x in (q, k))
    return _rope_qk_launch(kind, q, k, tables, interleaved)
