"""Kernel microbenchmark on a Llama-3-8B-shaped layer (B=1, 32 query heads, 8 kv heads, head_dim
128): attention for one decode step (L=1) over float16, 8-bit and 4-bit caches of growing context,
then RoPE and the quantizing cache's write for a few step lengths.

Per context and cache it prints the median time of the attention kernel (`attention(choice="kernel")`, where
MLX computes on a Metal or CUDA device; "n/a (cpu)" elsewhere), of the pure-MLX reference
(`attention(choice="reference")`) and, for the float16 cache, of `mx.fast.scaled_dot_product_attention`,
then reference/kernel and kernel/mx.fast (below 1x: the kernel is faster). The packed caches hold
the context in groups of --group-size slots, packed as the cache stores them (keys per channel,
values per token), then a float tail of half a group; the float16 cache holds as many keys. Every
operand is a view into a larger buffer, as a cache hands them out.

Per step length L (float16) it then prints q and k rotated in one launch (`rope_qk`: kernel,
reference, and `mx.fast.rope` called on q and on k), and whole blocks of L keys and values packed
into the 4-bit cache layout (`quantize_kv_blocks`: kernel, reference; no `mx.fast` peer). On the
CPU, keep --contexts small:

    python benchmarks/bench_kernels.py [--contexts 1024,2048] [--repetitions 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
from mlxfam.kernels import backend
from mlxfam.kernels.attention import attention
from mlxfam.kernels.kv_write import quantize_kv_blocks
from mlxfam.kernels.rope import rope_qk, rope_table

from mlxfam.kv_layout import QuantizedKV

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 32, 8, 128
CACHES = ("float16", "8-bit", "4-bit")


def operands(cache: str, context: int, group_size: int):
    """q, k, v for one decode step over `context` packed slots (or float16 keys) and a tail of half
    a group."""
    tail = group_size // 2
    keys_key, values_key, q_key, tail_key = mx.random.split(mx.random.key(0), 4)
    capacity = context + group_size
    q = mx.random.normal((BATCH, HEADS, 1, HEAD_DIM), key=q_key).astype(mx.float16)
    keys = mx.random.normal((BATCH, KV_HEADS, capacity, HEAD_DIM), key=keys_key).astype(mx.float16)
    values = mx.random.normal((BATCH, KV_HEADS, capacity, HEAD_DIM), key=values_key).astype(mx.float16)
    if cache == "float16":
        return q, keys[:, :, : context + tail], values[:, :, : context + tail]
    bits = int(cache.split("-")[0])
    tails = mx.random.normal((2, BATCH, KV_HEADS, group_size, HEAD_DIM), key=tail_key).astype(mx.float16)
    (k_data, k_scales, k_biases), v_parts = quantize_kv_blocks(keys, values, bits=bits, group_size=group_size)
    groups = context // group_size
    k = QuantizedKV(
        k_data[..., : context * bits // 32], k_scales[..., :groups], k_biases[..., :groups], tails[0][:, :, :tail],
        group_size, bits, True,
    )  # fmt: skip
    v = QuantizedKV(*(part[:, :, :context] for part in v_parts), tails[1][:, :, :tail], group_size, bits, False)
    return q, k, v


def median_ms(run, args: argparse.Namespace) -> float:
    """Median wall time of `run()`, evaluated, over args.repetitions runs."""
    for _ in range(args.warmup):
        mx.eval(run())
    times = []
    for _ in range(args.repetitions):
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def print_row(cells) -> None:
    print("".join(f"{cell:>12}" for cell in cells))


def timing_cells(kernel: float | None, reference: float, fast: float | None) -> list[str]:
    """kernel, reference and mx.fast times, then reference/kernel and kernel/mx.fast."""
    return [
        "n/a (cpu)" if kernel is None else f"{kernel:.3f}",
        f"{reference:.3f}",
        "" if fast is None else f"{fast:.3f}",
        "" if kernel is None else f"{reference / kernel:.2f}x",
        "" if kernel is None or fast is None else f"{kernel / fast:.2f}x",
    ]


def bench_attention(contexts: list[int], kind: str | None, args: argparse.Namespace) -> None:
    print(f"attention: L=1; median of {args.repetitions} runs, ms")
    print_row(("context", "cache", "kernel", "reference", "mx.fast", "ref/kernel", "kernel/fast"))
    for context in contexts:
        for cache in CACHES:
            q, k, v = operands(cache, context, args.group_size)
            mx.eval(q, k, v)

            def timed(attend):
                return median_ms(lambda: attend(q, k, v, scale=HEAD_DIM**-0.5), args)

            reference = timed(partial(attention, choice="reference"))
            kernel = None if kind is None else timed(partial(attention, choice="kernel"))
            fast = timed(mx.fast.scaled_dot_product_attention) if cache == "float16" else None
            print_row([str(context), cache, *timing_cells(kernel, reference, fast)])


def bench_rope(lengths: list[int], kind: str | None, args: argparse.Namespace) -> None:
    print(f"rope_qk and the 4-bit cache write (quantize_kv_blocks), float16; median of {args.repetitions} runs, ms")
    print_row(("L", "operation", "kernel", "reference", "mx.fast", "ref/kernel", "kernel/fast"))
    base, offset = 500000.0, 4096
    inv_freq = 1.0 / base ** (mx.arange(0, HEAD_DIM, 2, dtype=mx.float32) / HEAD_DIM)
    for length in lengths:
        q_key, k_key, v_key = mx.random.split(mx.random.key(1), 3)
        q = mx.random.normal((BATCH, HEADS, length, HEAD_DIM), key=q_key).astype(mx.float16)
        k, v = (mx.random.normal((BATCH, KV_HEADS, length, HEAD_DIM), key=x).astype(mx.float16) for x in (k_key, v_key))
        cos, sin = rope_table(mx.arange(offset, offset + length)[None], inv_freq)
        mx.eval(q, k, v, cos, sin)

        def rotated(choice):
            return lambda: rope_qk(q, k, cos, sin, rotary_dims=HEAD_DIM, interleaved=False, choice=choice)

        def fast_rope():
            return [mx.fast.rope(x, HEAD_DIM, traditional=False, base=base, scale=1.0, offset=offset) for x in (q, k)]

        reference = median_ms(rotated("reference"), args)
        kernel = None if kind is None else median_ms(rotated("kernel"), args)
        print_row([str(length), "rope_qk", *timing_cells(kernel, reference, median_ms(fast_rope, args))])
        if length % args.group_size == 0:

            def written(choice):
                return lambda: quantize_kv_blocks(k, v, bits=4, group_size=args.group_size, choice=choice)

            reference = median_ms(written("reference"), args)
            kernel = None if kind is None else median_ms(written("kernel"), args)
            print_row([str(length), "cache write", *timing_cells(kernel, reference, None)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="comma-separated context lengths")
    parser.add_argument(
        "--repetitions", type=int, default=20, help="timed runs per measurement (the median is printed)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (kernel compiles, allocations)")
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64), help="packed caches' group size")
    parser.add_argument(
        "--rope-lengths", default="1,64,512,2048", help="comma-separated step lengths for RoPE and the cache write"
    )
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(context % args.group_size for context in contexts):
        parser.error(f"contexts must be multiples of the group size {args.group_size} (they are the packed slots)")
    kind = backend()
    print(f"device {mx.default_device()}, kernels: {kind or 'none (the reference runs)'}")
    print(f"B={BATCH} Hq={HEADS} Hkv={KV_HEADS} D={HEAD_DIM}")
    bench_attention(contexts, kind, args)
    bench_rope([int(n) for n in args.rope_lengths.split(",")], kind, args)


if __name__ == "__main__":
    main()
