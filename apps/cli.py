"""The `mlxfam` command: generate, chat, list, inspect, families, convert, perplexity."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx

import mlxfam
from mlxfam import hub
from mlxfam.cache import CacheOptions
from mlxfam.convert import convert
from mlxfam.errors import MlxfamError
from mlxfam.generate import check_generation_options
from mlxfam.models import FAMILIES
from mlxfam.models.family import Traits
from mlxfam.quantize import BITS, GROUP_SIZES, RECIPES

from .chat import ChatSession, render_prompt, run_chat, stats_lines, terminal_lines

MODEL_HELP = (
    "an alias (see `mlxfam list`), a Hugging Face repo id (owner/name or hf.co/owner/name; owner/name:Q4_K_M picks "
    "a GGUF file by its quant tag), a model directory (DIR:TAG picks among its GGUF files) or a .gguf file (the "
    "first part of a split one)"
)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="compute dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--quantize",
        type=int,
        choices=BITS,
        metavar="BITS",
        help="quantize the float matrices in memory to BITS (2, 3, 4, 5, 6, 8); GGUF-quantized ones stay as they are",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        help="values per quantization group with --quantize (default: 64)",
    )


def load_model(args: argparse.Namespace, ref: str | None = None):
    """The model and tokenizer that the model flags ask for."""
    return mlxfam.load(ref or args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="use the raw text even if the model has a chat template"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate per reply (default: 256)"
    )
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 keeps all (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 keeps all (default: 1)")
    parser.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability (default: 0)"
    )
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables it (default: 1)")
    parser.add_argument(
        "--repetition-context-size",
        type=int,
        default=20,
        metavar="N",
        help="tokens the penalty looks back on (default: 20)",
    )
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument(
        "--stop", nargs="+", action="extend", default=[], metavar="S", help="stop when one of these strings appears"
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        metavar="N",
        help=f"bound the KV cache to N tokens: the first {CacheOptions.keep} and the most recent ones",
    )
    add_kv_cache_flags(parser)
    parser.add_argument(
        "--prefill-step-size", type=int, default=512, metavar="N", help="prompt tokens per prefill chunk (default: 512)"
    )


def add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-bits", type=int, metavar="BITS", help="quantize the KV cache's keys and values to BITS (4 or 8)"
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=CacheOptions.kv_group_size,
        metavar="N",
        help="values per KV quantization group: 32 or 64, dividing the head size "
        f"(default: {CacheOptions.kv_group_size})",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=CacheOptions.quantized_kv_start,
        metavar="N",
        help="with --kv-bits, quantize the cache once it holds N tokens (default: 0, from the start)",
    )


def cache_options(args: argparse.Namespace, max_kv_size: int | None = None) -> CacheOptions:
    """The KV cache flags' options (`max_kv_size`: the generating commands' --max-kv-size), checked
    before the (slow) model load."""
    return CacheOptions(
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        max_kv_size=max_kv_size,
        quantized_kv_start=args.quantized_kv_start,
    )


def generation_options(args: argparse.Namespace) -> dict:
    """The stream_generate keyword arguments from the flags but the cache options, checked before
    the (slow) model load."""
    options = dict(
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        seed=args.seed,
        stop=tuple(args.stop),
        prefill_step_size=args.prefill_step_size,
    )
    check_generation_options(**options)
    return options


def cmd_generate(args: argparse.Namespace) -> None:
    options = generation_options(args)
    kv_options = cache_options(args, args.max_kv_size)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    prompt = render_prompt(tokenizer, messages, use_chat_template=not args.no_chat_template)
    if args.verbose:
        print(tokenizer.decode(prompt), file=sys.stderr)
    response = None
    cache = model.make_cache(kv_options)
    responses = mlxfam.stream_generate(
        model, tokenizer, prompt, cache=cache, max_kv_size=kv_options.max_kv_size, **options
    )
    for response in responses:
        print(response.text, end="", flush=True)
    print(flush=True)
    if not args.quiet and response is not None:
        print("\n".join(stats_lines(response)), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    options = generation_options(args)
    kv_options = cache_options(args, args.max_kv_size)
    model, tokenizer = load_model(args)
    session = ChatSession(
        model,
        tokenizer,
        args.system,
        use_chat_template=not args.no_chat_template,
        cache_options=kv_options,
        prompt_cache=args.prompt_cache,
        **options,
    )
    # Piped input: one turn per line and nothing on stdout but the replies.
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"mlxfam chat with {args.model}. Type a message; /help lists commands; /quit or Ctrl-D exits.",
            file=sys.stderr,
        )
    run_chat(session, terminal_lines() if interactive else sys.stdin, interactive=interactive, show_stats=args.verbose)


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, but the last."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for *cells, last in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)), last, sep="  ")


def human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def cmd_list(args: argparse.Namespace) -> None:
    rows = [("ALIAS", "REPO", "DESCRIPTION", "DOWNLOADED")]
    for status in hub.list_models():
        rows.append((status.alias.name, status.alias.repo, status.alias.description, str(status.location or "no")))
    print_table(rows)
    ggufs = hub.cached_ggufs()
    if ggufs:
        print("\nCached GGUF files:")
        rows = [("TAG", "SIZE", "REFERENCE", "PATH")]
        for gguf in ggufs:
            parts = f" ({gguf.parts} parts)" if gguf.parts > 1 else ""
            rows.append((gguf.tag or "-", human_size(gguf.size), gguf.reference, f"{gguf.path}{parts}"))
        print_table(rows)


def parameter_counts(model) -> Counter:
    """Parameters per storage kind ("float16", "4-bit quantized", ...), as the checkpoint counts
    them: a quantized weight counts its unpacked values, its scales and biases do not count."""
    counts = Counter()
    for _, module in model.named_modules():
        bits = getattr(module, "bits", None)
        for name, value in module.items():
            # Underscored arrays are buffers (rotary tables), not parameters.
            if not isinstance(value, mx.array) or name.startswith("_") or (bits and name in ("scales", "biases")):
                continue
            if bits and name == "weight":
                counts[f"{bits}-bit quantized"] += value.size * 32 // bits
            else:
                counts[str(value.dtype).removeprefix("mlx.core.")] += value.size
    return counts


def cmd_inspect(args: argparse.Namespace) -> None:
    source = hub.resolve(args.model)
    model, tokenizer = load_model(args, str(source))
    print(model)
    print()
    print(f"source: {source}")
    counts = parameter_counts(model)
    print(f"parameters: {sum(counts.values()):,}")
    print(f"dtypes: {', '.join(f'{kind} ({count:,})' for kind, count in counts.most_common())}")
    print("config:")
    for field in dataclasses.fields(model.config):
        print(f"  {field.name}: {getattr(model.config, field.name)}")
    print(f"context length: {model.context_length}")
    if tokenizer is None:
        print("tokenizer: none (the checkpoint has no tokenizer files)")
        return
    template = "yes" if tokenizer.chat_template is not None else "no"
    if tokenizer.chat_format is not None:
        template = f"built-in {tokenizer.chat_format.name} format"
    print(
        f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer):,} tokens, bos {tokenizer.bos_token!r}, "
        f"eos {tokenizer.eos_token!r}, chat template: {template}"
    )


def cmd_families(args: argparse.Namespace) -> None:
    """One row per family, one column per way it differs from Llama, read off the family definitions."""
    columns = [field.name for field in dataclasses.fields(Traits)]
    rows = [["family", "loads", *(column.replace("_", " ") for column in columns)]]
    for family in FAMILIES:
        traits = family.traits
        rows.append([family.name, family.description, *(getattr(traits, column) for column in columns)])
    if args.markdown:
        for i, row in enumerate(rows):
            print("| " + " | ".join(row) + " |")
            if i == 0:
                print("|" + "---|" * len(row))
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def describe_quantization(quantization: dict | None) -> str:
    if quantization is None:
        return "none"
    layers = [path for path, entry in quantization.items() if isinstance(entry, dict)]
    text = f"{quantization['bits']}-bit, group size {quantization['group_size']}"
    return text + (f"; {len(layers)} layer(s) otherwise: {', '.join(layers)}" if layers else "")


def cmd_convert(args: argparse.Namespace) -> None:
    result = convert(
        args.model,
        args.output,
        bits=args.bits,
        group_size=args.group_size,
        recipe=args.recipe,
        overrides=args.override,
        dtype=args.dtype,
        dequantize=args.dequantize,
    )
    print(f"wrote {result.path}: {', '.join(result.files)}")
    print(f"quantization: {describe_quantization(result.quantization)}")
    print(f"{result.bits_per_weight:.2f} bits per weight")


def cmd_perplexity(args: argparse.Namespace) -> None:
    if args.tokens < 2 or args.chunk_size < 1:
        raise MlxfamError("--tokens must be >= 2 and --chunk-size >= 1")
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxfamError(f"{args.file}: cannot read the text ({e})") from None
    kv_options = cache_options(args)
    model, tokenizer = load_model(args)
    if tokenizer is None:
        raise MlxfamError(f"{args.model}: the checkpoint has no tokenizer to turn the text into tokens")
    tokens = tokenizer.encode(text)[: args.tokens]
    cache = model.make_cache(kv_options)
    ppl = mlxfam.perplexity(model, tokens, chunk_size=args.chunk_size, cache=cache)
    whole = f"; the whole text, shorter than the {args.tokens} asked" if len(tokens) < args.tokens else ""
    print(f"tokens: {len(tokens)} ({len(tokens) - 1} predicted{whole})")
    print(f"perplexity: {ppl:.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxfam", description="Run Llama-like LLMs locally on MLX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a reply to one prompt")
    add_generation_flags(generate)
    generate.add_argument("-p", "--prompt", required=True, metavar="TEXT", help='the prompt ("-" reads it from stdin)')
    shown = generate.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true", help="also print the rendered prompt to stderr")
    shown.add_argument("--quiet", action="store_true", help="do not print the statistics to stderr")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="chat with a model (reads one turn per line when stdin is not a terminal)")
    add_generation_flags(chat)
    chat.add_argument("--verbose", action="store_true", help="print statistics after each reply to stderr")
    chat.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="resume the conversation and KV cache saved in FILE (if it exists); save them there after each turn",
    )
    chat.set_defaults(run=cmd_chat)

    listing = commands.add_parser(
        "list", help="list the model aliases, which are downloaded, and the cached GGUF files"
    )
    listing.set_defaults(run=cmd_list)

    inspect = commands.add_parser(
        "inspect", help="print a model's modules, parameter count, dtypes, config and tokenizer"
    )
    add_model_flags(inspect)
    inspect.set_defaults(run=cmd_inspect)

    families = commands.add_parser("families", help="print how each supported family differs from Llama")
    families.add_argument("--markdown", action="store_true", help="print a Markdown table")
    families.set_defaults(run=cmd_families)

    converting = commands.add_parser(
        "convert", help="write a model as an MLX directory (mlx-lm's layout), optionally quantized"
    )
    converting.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    converting.add_argument("-o", "--output", required=True, metavar="DIR", help="the new directory")
    converting.add_argument("--bits", type=int, choices=BITS, help="quantize the float matrices to BITS")
    converting.add_argument(
        "--group-size", type=int, choices=GROUP_SIZES, help="values per quantization group (default: 64)"
    )
    converting.add_argument(
        "--recipe",
        metavar="NAME|FILE.json",
        help=f"mixed bits: {', '.join(RECIPES)}, or a JSON file {{bits, group_size, overrides}}",
    )
    converting.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=BITS[:GROUP]",
        help="bits for the layers a glob matches (e.g. 'layers.0.*=8', 'lm_head=8:32', 'lm_head=none'); repeatable",
    )
    converting.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the float tensors (default: the source's)"
    )
    converting.add_argument(
        "--dequantize",
        action="store_true",
        help="turn the source's quantized tensors (GGUF, MLX) to float first; --bits/--recipe then requantize them",
    )
    converting.set_defaults(run=cmd_convert)

    scoring = commands.add_parser("perplexity", help="perplexity of a model on the first tokens of a text file")
    add_model_flags(scoring)
    scoring.add_argument("--file", required=True, metavar="TEXT", help="a UTF-8 text file")
    scoring.add_argument("--tokens", type=int, default=512, metavar="N", help="score the first N tokens (default: 512)")
    scoring.add_argument(
        "--chunk-size", type=int, default=512, metavar="N", help="tokens per forward, with the KV cache (default: 512)"
    )
    add_kv_cache_flags(scoring)
    scoring.set_defaults(run=cmd_perplexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MlxfamError as error:
        print(f"mlxfam: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`mlxfam generate ... | head`): stop quietly. Pointing
        # stdout at /dev/null keeps Python's exit-time flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
