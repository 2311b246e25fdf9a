"""KV cache memory: bytes held and peak memory during a long prefill, quantized vs float16 cache,
mlxfam next to mlx-lm on the same weights, all in one run.

The model is a synthetic Llama (random float16 weights, seeded) written once as a Hugging Face
directory that both runtimes load. Each runtime prefills the same random prompt in chunks of
--prefill-step-size tokens, as generation does (the logits are never computed; each chunk ends by
evaluating the cache), once with a float16 cache and once with a quantized one (mlxfam:
`model.make_cache(CacheOptions(kv_bits=..., kv_group_size=...))`; mlx-lm: `mlx_lm.models.cache.QuantizedKVCache`).
Printed per run: the cache's bytes, and the peak memory of the prefill, in total and above the
memory held before it (the weights).

This CPU is slow (~2 GFLOP/s), and on the CPU mlx-lm's quantized attention runs MLX's float16
quantized matmul, which is far slower than its float32 one (mlxfam computes those in float32), so
keep --layers and --context small here:

    python benchmarks/bench_kv_memory.py [--layers 12] [--context 8192] [--kv-bits 4] [--kv-group-size 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache as LmKVCache
from mlx_lm.models.cache import QuantizedKVCache as LmQuantizedKVCache
from mlx_lm.utils import load_model as lm_load_model

import mlxfam
from mlxfam import CacheOptions


def write_model(directory: Path, args: argparse.Namespace) -> Path:
    head_dim = args.hidden // args.heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max(args.context, 4096),
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    shapes = {"model.embed_tokens.weight": (args.vocab, args.hidden), "model.norm.weight": (args.hidden,)}
    shapes["lm_head.weight"] = (args.vocab, args.hidden)
    for i in range(args.layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (args.hidden,),
            layer + "post_attention_layernorm.weight": (args.hidden,),
            layer + "self_attn.q_proj.weight": (args.heads * head_dim, args.hidden),
            layer + "self_attn.k_proj.weight": (args.kv_heads * head_dim, args.hidden),
            layer + "self_attn.v_proj.weight": (args.kv_heads * head_dim, args.hidden),
            layer + "self_attn.o_proj.weight": (args.hidden, args.heads * head_dim),
            layer + "mlp.gate_proj.weight": (args.intermediate, args.hidden),
            layer + "mlp.up_proj.weight": (args.intermediate, args.hidden),
            layer + "mlp.down_proj.weight": (args.hidden, args.intermediate),
        }
    key = mx.random.key(args.seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        key, draw = mx.random.split(key)
        if len(shape) == 1:
            weights[name] = mx.ones(shape, mx.float16)
        else:
            std = 1.0 if "embed" in name else shape[1] ** -0.5
            weights[name] = (mx.random.normal(shape, key=draw) * std).astype(mx.float16)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    return directory


def load(runtime: str, directory: Path):
    if runtime == "mlxfam":
        model, _ = mlxfam.load(directory, dtype="float16")
    else:
        model, _ = lm_load_model(directory)
    mx.eval(model.parameters())
    return model


def make_cache(runtime: str, model, kv_bits: int | None, group_size: int) -> list:
    if runtime == "mlxfam":
        return model.make_cache(CacheOptions(kv_bits=kv_bits, kv_group_size=group_size))
    if kv_bits is None:
        return [LmKVCache() for _ in model.layers]
    return [LmQuantizedKVCache(group_size=group_size, bits=kv_bits) for _ in model.layers]


def prefill(runtime: str, directory: Path, prompt: mx.array, kv_bits, args) -> dict:
    model = load(runtime, directory)
    cache = make_cache(runtime, model, kv_bits, args.kv_group_size)
    mx.clear_cache()
    held_before = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for i in range(0, prompt.size, args.prefill_step_size):
        model(prompt[i : i + args.prefill_step_size][None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    result = {"kv_bytes": sum(c.nbytes for c in cache), "peak": peak, "above": peak - held_before, "seconds": seconds}
    del model, cache
    gc.collect()
    mx.clear_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens to prefill (default: 8192)")
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--kv-bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--kv-group-size", type=int, default=CacheOptions.kv_group_size, choices=(32, 64))
    parser.add_argument("--runtimes", default="mlxfam,mlx-lm", help="comma-separated: mlxfam, mlx-lm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runtimes = args.runtimes.split(",")

    print(f"$ python {' '.join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])}")
    print(
        f"{platform.machine()} {platform.system()}, {mx.default_device()}; mlx {version('mlx')}, "
        f"mlx-lm {version('mlx-lm')}, mlxfam {version('mlxfam')}"
    )
    print(
        f"synthetic Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads "
        f"(head_dim {args.hidden // args.heads}), float16; prompt {args.context} tokens in chunks of "
        f"{args.prefill_step_size}; quantized cache: {args.kv_bits}-bit, group {args.kv_group_size}"
    )
    prompt = mx.random.randint(0, args.vocab, (args.context,), key=mx.random.key(args.seed + 1)).astype(mx.int32)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_model(Path(tmp) / "model", args)
        results = {
            (runtime, kind): prefill(runtime, directory, prompt, bits, args)
            for runtime in runtimes
            for kind, bits in (("float16", None), (f"{args.kv_bits}-bit", args.kv_bits))
        }

    mib = 2**20
    print()
    print(
        f"{'runtime':8}  {'cache':8}  {'KV MiB':>8}  {'vs fp16':>7}  {'peak MiB':>9}  {'above weights':>13}  {'prefill s':>9}"
    )
    for (runtime, kind), r in results.items():
        ratio = r["kv_bytes"] / results[(runtime, "float16")]["kv_bytes"]
        print(
            f"{runtime:8}  {kind:8}  {r['kv_bytes'] / mib:8.1f}  {ratio:7.3f}  {r['peak'] / mib:9.1f}  "
            f"{r['above'] / mib:13.1f}  {r['seconds']:9.1f}"
        )
    quantized = f"{args.kv_bits}-bit"
    print()
    for runtime in runtimes:
        fp16, q = results[(runtime, "float16")], results[(runtime, quantized)]
        verdict = "<=" if q["peak"] <= fp16["peak"] else ">"
        print(
            f"{runtime}: {quantized} KV bytes {q['kv_bytes'] / fp16['kv_bytes']:.3f}x float16; "
            f"prefill peak {q['peak'] / mib:.1f} MiB {verdict} float16's {fp16['peak'] / mib:.1f} MiB"
        )


if __name__ == "__main__":
    main()
