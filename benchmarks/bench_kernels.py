"""Attention microbenchmark: one decode step (L=1) of a Llama-3-8B-shaped layer (B=1, 32 query
heads, 8 kv heads, head_dim 128) over float16, 8-bit and 4-bit caches of growing context.

Per context and cache it prints the median time of the attention kernel (`attention(choice="kernel")`, where
MLX computes on a Metal or CUDA device; "n/a (cpu)" elsewhere), of the pure-MLX reference
(`attention(choice="reference")`) and, for the float16 cache, of `mx.fast.scaled_dot_product_attention`,
then reference/kernel and kernel/mx.fast (below 1x: the kernel is faster). The packed caches hold
the context in groups of --group-size slots, packed as the cache stores them (keys per channel,
values per token), then a float tail of half a group; the float16 cache holds as many keys. Every
operand is a view into a larger buffer, as a cache hands them out. On the CPU, keep --contexts
small:

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

from mlxfam.cache import QuantizedKV

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
    k_data, k_scales, k_biases = mx.quantize(keys.swapaxes(-1, -2), group_size=group_size, bits=bits)
    v_parts = mx.quantize(values, group_size=group_size, bits=bits)
    groups = context // group_size
    k = QuantizedKV(
        k_data[..., : context * bits // 32], k_scales[..., :groups], k_biases[..., :groups], tails[0][:, :, :tail],
        group_size, bits, True,
    )  # fmt: skip
    v = QuantizedKV(*(part[:, :, :context] for part in v_parts), tails[1][:, :, :tail], group_size, bits, False)
    return q, k, v


def median_ms(attend, q, k, v, args: argparse.Namespace) -> float:
    """Median wall time of `attend(q, k, v, scale=...)`, evaluated, over args.repetitions runs."""
    for _ in range(args.warmup):
        mx.eval(attend(q, k, v, scale=HEAD_DIM**-0.5))
    times = []
    for _ in range(args.repetitions):
        start = time.perf_counter()
        mx.eval(attend(q, k, v, scale=HEAD_DIM**-0.5))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="comma-separated context lengths")
    parser.add_argument(
        "--repetitions", type=int, default=20, help="timed runs per measurement (the median is printed)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (kernel compiles, allocations)")
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64), help="packed caches' group size")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(context % args.group_size for context in contexts):
        parser.error(f"contexts must be multiples of the group size {args.group_size} (they are the packed slots)")
    kind = backend()
    print(f"device {mx.default_device()}, kernels: {kind or 'none (the reference runs)'}")
    print(f"B={BATCH} Hq={HEADS} Hkv={KV_HEADS} D={HEAD_DIM} L=1; median of {args.repetitions} runs, ms")
    header = ("context", "cache", "kernel", "reference", "mx.fast", "ref/kernel", "kernel/fast")
    print("".join(f"{h:>12}" for h in header))
    for context in contexts:
        for cache in CACHES:
            q, k, v = operands(cache, context, args.group_size)
            mx.eval(q, k, v)
            reference = median_ms(partial(attention, choice="reference"), q, k, v, args)
            kernel = None if kind is None else median_ms(partial(attention, choice="kernel"), q, k, v, args)
            fast = median_ms(mx.fast.scaled_dot_product_attention, q, k, v, args) if cache == "float16" else None
            row = [
                str(context), cache,
                "n/a (cpu)" if kernel is None else f"{kernel:.3f}",
                f"{reference:.3f}",
                "" if fast is None else f"{fast:.3f}",
                "" if kernel is None else f"{reference / kernel:.2f}x",
                "" if kernel is None or fast is None else f"{kernel / fast:.2f}x",
            ]  # fmt: skip
            print("".join(f"{cell:>12}" for cell in row))


if __name__ == "__main__":
    main()
