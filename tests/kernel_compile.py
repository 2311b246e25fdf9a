"""Compiles CUDA kernel bodies as `mx.fast.cuda_kernel` wraps them, with nvcc, and runs them on the
CPU: no GPU needed.

MLX (mlx/backend/cuda/custom_kernel.cpp, `build_kernel`) compiles, after its preamble
(mlx/backend/cuda/device/utils.cuh: cuda_fp16.h, cuda_bf16.h, cuda/std/array, limits and tuple,
and the `Shape`/`Strides` arrays; cooperative_groups.h) and the kernel's header, in namespace mlx::core::cu:

    __global__ void custom_kernel_<name><template hash>(
        const <type>* <input>, [const __grid_constant__ Shape <input>_shape,]
        [const __grid_constant__ Strides <input>_strides,] [const __grid_constant__ int <input>_ndim,] ...
        <type>* <output>, ...) {
      constexpr int <N> = ...; constexpr bool <B> = ...; using <T> = <type>;
      <body>
    }

where an input's shape/strides/ndim come only when the body names them. `cuda_source` writes that
for a set of launches (the preamble and header once, each distinct launch once) and `nvcc_compile`
compiles its device code with `nvcc -cubin -std=c++17 -arch=sm_90` (device code only, as MLX's
NVRTC does: no host compile, which would only add time).

`Emulation` compiles the same bodies with g++ over a CPU emulation of CUDA's execution model
(threads as fibers, warp shuffles and __syncthreads as barriers among them) and runs them on numpy
arrays, so a kernel's results can be checked here against an oracle, and a shuffle or barrier that
not every thread reaches shows up as a deadlock.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlxfam.kernels import prelude, sections, split_sections

NVCC = shutil.which("nvcc")
MAX_NDIM = 10  # mlx/backend/cuda/device/config.h

# mlx/backend/cuda/utils.cpp `dtype_to_cuda_type`, and mlx/backend/common/compiled.cpp
# `get_type_string` (what the kernel name's template hash spells).
CUDA_TYPES = {
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
    mx.uint8: "uint8_t",
    mx.bool_: "bool",
}
TYPE_STRINGS = {
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
    mx.uint8: "uint8_t",
    mx.bool_: "bool",
}

PREAMBLE = f"""#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/tuple>
#include <cstdint>

#include <cooperative_groups.h>

namespace mlx::core::cu {{
using Shape = cuda::std::array<int32_t, {MAX_NDIM}>;
using Strides = cuda::std::array<int64_t, {MAX_NDIM}>;
}}  // namespace mlx::core::cu
"""

Arg = tuple[str, object]  # (name, dtype), or (name, template value)


def _template_hash(template: list[Arg]) -> str:
    def spelled(value) -> str:
        if isinstance(value, bool):
            return "t" if value else "f"
        return str(value) if isinstance(value, int) else TYPE_STRINGS[value]

    return "".join(f"_{spelled(value)}" for _, value in template)


def _template_lines(template: list[Arg], types: dict = CUDA_TYPES) -> str:
    def line(name: str, value) -> str:
        if isinstance(value, bool):
            return f"  constexpr bool {name} = {str(value).lower()};\n"
        if isinstance(value, int):
            return f"  constexpr int {name} = {value};\n"
        return f"  using {name} = {types[value]};\n"

    return "".join(line(name, value) for name, value in template) + "\n" if template else ""


def kernel_function(name: str, body: str, inputs: list[Arg], outputs: list[Arg], template: list[Arg]) -> str:
    """The `__global__` function MLX generates for one launch; inputs are arrays of at least one
    dimension, given as (name, dtype) in `input_names` order, outputs likewise."""
    params = []
    for arg, dtype in inputs:
        params.append(f"    const {CUDA_TYPES[dtype]}* {arg}")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
            if f"{arg}_{suffix}" in body:
                params.append(f"    const __grid_constant__ {kind} {arg}_{suffix}")
    params += [f"    {CUDA_TYPES[dtype]}* {arg}" for arg, dtype in outputs]
    signature = ",\n".join(params)
    return (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        f"__global__ void custom_kernel_{name}{_template_hash(template)}(\n{signature}) {{\n"
        f"{_template_lines(template)}{body}\n}}\n\n}} // namespace mlx::core::cu\n"
    )


def cuda_source(header: str, functions: list[str]) -> str:
    """One translation unit: MLX's preamble, the kernels' shared header once, each function once."""
    return PREAMBLE + header + "\n" + "\n".join(dict.fromkeys(functions))


def nvcc_compile(source: str, workdir: Path, optimize: bool = True) -> None:
    """Compiles `source` for sm_90; fails the test with nvcc's log when it does not compile.
    `optimize=False` turns the device optimizers off (-O0): the same language and resource checks
    in a fraction of the time, for sources of many instantiations."""
    path = workdir / "kernels.cu"
    path.write_text(source, encoding="utf-8")
    levels = [] if optimize else ["-Xcicc", "-O0", "-Xptxas", "-O0"]
    result = subprocess.run(
        [NVCC, "-cubin", "-std=c++17", "-arch=sm_90", *levels, "-o", str(workdir / "kernels.cubin"), str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"nvcc failed on {path}:\n{result.stderr}"


# --- the Metal and CUDA twins ------------------------------------------------------------------

# What only one platform spells so (CUDA's or Metal's qualifiers, thread indices, shuffles, barriers,
# shared memory, math functions): the kernels' shared text must name none of it outside comments.
PLATFORM_WORDS = re.compile(
    r"__\w+|\b(?:threadIdx|blockIdx|blockDim|gridDim|cuda|metal|threadgroup|device|constant|"
    r"thread_\w+|simd\w*|simdgroup_\w+|quadgroup_\w+|f?(?:min|max|abs|exp|tanh|round)f|ushort)\b"
)
# What a prelude defines: macros, helper functions (return type, name, parameters) and the indices.
PRELUDE_NAMES = re.compile(
    r"^#define (\w+)|^(?:__device__ __forceinline__ |inline )(\w+ \w+\([^)]*\))|^\s*const \w+ (\w+) =",
    re.MULTILINE,
)


def uncommented(text: str) -> str:
    return re.sub(r"//.*", "", text)


def assert_one_algorithm(*kernels: str) -> None:
    """The Metal and CUDA sources of `kernels` are one text: each backend's sections are its prelude's
    then the shared text; the shared text names nothing of either platform; and the two preludes
    define the same macros, helpers (same signatures) and thread indices, in the same order. So
    what is checked of the CUDA kernels (compiled by nvcc, run by the emulation) holds of the Metal
    kernels' algorithm."""
    shared: dict[str, str] = {"header": ""}
    for kernel in kernels:
        for name, text in split_sections(f"{kernel}.inc").items():
            shared[name] = shared[name] + text if name == "header" else text
    for name, text in shared.items():
        assert not PLATFORM_WORDS.findall(uncommented(text)), (name, PLATFORM_WORDS.findall(uncommented(text)))
    defined = {}
    for kind in ("metal", "cuda"):
        platform = prelude(kind)
        expected = {name: platform["indices"] + text for name, text in shared.items()}
        expected["header"] = platform["header"] + shared["header"]
        assert sections(kind, *kernels) == expected, kind
        defined[kind] = PRELUDE_NAMES.findall(uncommented(platform["header"] + platform["indices"]))
    assert defined["metal"] == defined["cuda"] and len(defined["cuda"]) > 10, defined


# --- running kernel bodies on the CPU ----------------------------------------------------------

GXX = shutil.which("g++")

# CUDA's execution model on the CPU, so a kernel body runs without a GPU: each thread of a block is
# a fiber (ucontext) run in turn until it waits at a barrier; a warp shuffle is two barriers of the
# warp's 32 fibers around an exchange slot, __syncthreads one of the block's. Blocks run one after
# another, so a `__shared__` array is a static one. A wait no thread can end (a shuffle or barrier
# not every thread reaches) is reported as such. `__half` is _Float16; bfloat16 is not emulated.
EMULATION_PRELUDE = r"""
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>
#include <ucontext.h>

#define __device__
#define __forceinline__ inline
#define __shared__ static
using std::max;
using std::min;
namespace cuda { namespace std { using ::std::numeric_limits; } }
namespace mlx::core::cu {
using Shape = std::array<int32_t, MAX_NDIM>;
using Strides = std::array<int64_t, MAX_NDIM>;
}

struct Index3 { int x = 0, y = 0, z = 0; };
static Index3 threadIdx, blockIdx;

namespace emulation {
struct Fiber { ucontext_t context; int thread = 0; bool done = false; std::vector<char> stack; };
struct Barrier { int arrived = 0; unsigned generation = 0; };
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static int running = 0;
static long events = 0;
static Barrier block_barrier, warp_barriers[32];
static float exchange[32][32];
static std::function<void()> kernel;

inline void wait(Barrier& barrier, int count) {
  unsigned generation = barrier.generation;
  ++events;
  if (++barrier.arrived == count) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) swapcontext(&fibers[running].context, &scheduler);
}

static void fiber_main() {
  kernel();
  fibers[running].done = true;
  ++events;
}

// Runs every thread of the current block to its end; false when they wait on each other forever.
inline bool run_block(int threads) {
  fibers.assign(threads, Fiber{});
  block_barrier = Barrier{};
  for (Barrier& barrier : warp_barriers) barrier = Barrier{};
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = fibers[t];
    fiber.thread = t;
    fiber.stack.resize(1 << 17);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
  for (;;) {
    long before = events;
    bool all_done = true;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].done) continue;
      all_done = false;
      running = t;
      threadIdx.x = t;
      swapcontext(&scheduler, &fibers[t].context);
    }
    if (all_done) return true;
    if (events == before) return false;
  }
}
}  // namespace emulation

inline float __shfl_sync(unsigned, float value, int lane) {
  const int warp = threadIdx.x / 32;
  emulation::exchange[warp][threadIdx.x % 32] = value;
  emulation::wait(emulation::warp_barriers[warp], 32);
  const float result = emulation::exchange[warp][lane % 32];
  emulation::wait(emulation::warp_barriers[warp], 32);
  return result;
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  return __shfl_sync(mask, value, (threadIdx.x % 32) ^ lane_mask);
}

// uint32 words moved down the warp (a lane past its end keeps its own value, as in CUDA).
namespace emulation { static uint32_t exchange_words[32][32]; }
inline uint32_t __shfl_down_sync(unsigned, uint32_t value, unsigned delta) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emulation::exchange_words[warp][lane] = value;
  emulation::wait(emulation::warp_barriers[warp], 32);
  const uint32_t result = lane + delta < 32 ? emulation::exchange_words[warp][lane + delta] : value;
  emulation::wait(emulation::warp_barriers[warp], 32);
  return result;
}

#define blockDim (Index3{static_cast<int>(emulation::fibers.size()), 1, 1})

inline void __syncthreads() {
  emulation::wait(emulation::block_barrier, static_cast<int>(emulation::fibers.size()));
}
""".replace("MAX_NDIM", str(MAX_NDIM))

HOST_TYPES = {mx.float32: "float", mx.float16: "_Float16", mx.int32: "int32_t", mx.uint32: "uint32_t", mx.bool_: "bool"}
NUMPY_TYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32}


def emulated_function(name: str, body: str, inputs: list[Arg], outputs: list[Arg], template: list[Arg]) -> str:
    """The kernel as `kernel_function` writes it (host types), and `run_<name><template hash>`, a C
    entry point that runs it over a grid of blocks: (inputs, their shapes and strides as
    MAX_NDIM-wide rows, outputs, blocks in x, y and z, threads per block) -> 0, or 1 when a block's
    threads deadlock."""
    function = f"{name}{_template_hash(template)}"
    params, args = [], []
    for i, (arg, dtype) in enumerate(inputs):
        params.append(f"const {HOST_TYPES[dtype]}* {arg}")
        args.append(f"static_cast<const {HOST_TYPES[dtype]}*>(inputs[{i}])")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides")):
            if f"{arg}_{suffix}" in body:
                params.append(f"const {kind} {arg}_{suffix}")
                args.append(f"{suffix}_row({i})")
    for i, (arg, dtype) in enumerate(outputs):
        params.append(f"{HOST_TYPES[dtype]}* {arg}")
        args.append(f"static_cast<{HOST_TYPES[dtype]}*>(outputs[{i}])")
    return f"""
namespace mlx::core::cu {{
void {function}({", ".join(params)}) {{
{_template_lines(template, HOST_TYPES)}{body}
}}
}}  // namespace mlx::core::cu

extern "C" int run_{function}(void** inputs, const int32_t* shapes, const int64_t* strides, void** outputs,
                              int blocks_x, int blocks_y, int blocks_z, int threads) {{
  using namespace mlx::core::cu;
  auto shape_row = [&](int i) {{
    Shape row{{}};
    for (int d = 0; d < {MAX_NDIM}; ++d) row[d] = shapes[i * {MAX_NDIM} + d];
    return row;
  }};
  auto strides_row = [&](int i) {{
    Strides row{{}};
    for (int d = 0; d < {MAX_NDIM}; ++d) row[d] = strides[i * {MAX_NDIM} + d];
    return row;
  }};
  emulation::kernel = [&] {{ {function}({", ".join(args)}); }};
  for (int z = 0; z < blocks_z; ++z) {{
    for (int y = 0; y < blocks_y; ++y) {{
      for (int x = 0; x < blocks_x; ++x) {{
        blockIdx = {{x, y, z}};
        if (!emulation::run_block(threads)) return 1;
      }}
    }}
  }}
  return 0;
}}
"""


class Emulation:
    """Kernels compiled for the CPU (`emulated_function`s after the kernels' header), to run."""

    def __init__(self, header: str, functions: list[str], workdir: Path):
        path = workdir / "emulation.cpp"
        path.write_text(EMULATION_PRELUDE + header + "\n".join(dict.fromkeys(functions)), encoding="utf-8")
        library = workdir / "emulation.so"
        result = subprocess.run(
            [GXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(library), str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"g++ failed on {path}:\n{result.stderr}"
        self.library = ctypes.CDLL(str(library))

    def run(
        self, name: str, template: list[Arg], inputs: list[np.ndarray], outputs: list[np.ndarray], grid, threadgroup
    ) -> None:
        """Runs kernel `name` as MLX launches it: `grid` and `threadgroup` in threads (blocks of
        threadgroup[0] threads; y and z of the threadgroup 1), inputs of any strides, outputs
        C-contiguous, written in place."""
        assert threadgroup[1:] == (1, 1) and all(x.flags.c_contiguous for x in outputs)
        shapes = np.zeros((len(inputs), MAX_NDIM), np.int32)
        strides = np.zeros((len(inputs), MAX_NDIM), np.int64)
        for i, x in enumerate(inputs):
            shapes[i, : x.ndim] = x.shape
            strides[i, : x.ndim] = [step // x.itemsize for step in x.strides]
        pointers = [(ctypes.c_void_p * len(arrays))(*(x.ctypes.data for x in arrays)) for arrays in (inputs, outputs)]
        threads = min(threadgroup[0], grid[0])
        entry = getattr(self.library, f"run_{name}{_template_hash(template)}")
        tables = [ctypes.c_void_p(table.ctypes.data) for table in (shapes, strides)]
        status = entry(pointers[0], *tables, pointers[1], -(-grid[0] // threads), grid[1], grid[2], threads)
        assert status == 0, f"{name}: the threads of a block wait at a barrier (or shuffle) the others never reach"

    def call(
        self,
        name: str,
        *,
        inputs: list[np.ndarray],
        template: list[Arg],
        grid,
        threadgroup,
        output_shapes,
        output_dtypes,
    ) -> list[mx.array]:
        """`run` as an mx.fast kernel object is called: fresh outputs of the given shapes and dtypes,
        returned as MLX arrays."""
        outputs = [np.zeros(shape, NUMPY_TYPES[dtype]) for shape, dtype in zip(output_shapes, output_dtypes)]
        self.run(name, template, inputs, outputs, grid, threadgroup)
        return [mx.array(out) for out in outputs]
