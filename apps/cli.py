"""The `mlxfam` command: generate, chat, list, inspect, families."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter

import mlx.core as mx

import mlxfam
from mlxfam import hub
from mlxfam.errors import MlxfamError
from mlxfam.generate import check_generation_options
from mlxfam.models import FAMILIES
from mlxfam.models.family import Traits

from .chat import ChatSession, render_prompt, run_chat, stats_lines, terminal_lines

MODEL_HELP = "an alias (see `mlxfam list`), a Hugging Face repo id (owner/name), a model directory or a .gguf file"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="compute dtype (default: the checkpoint's)"
    )


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
        "--max-kv-size", type=int, metavar="N", help="keep only the N most recent tokens in the KV cache"
    )
    parser.add_argument(
        "--prefill-step-size", type=int, default=512, metavar="N", help="prompt tokens per prefill chunk (default: 512)"
    )


def generation_options(args: argparse.Namespace) -> dict:
    """The stream_generate keyword arguments from the flags, checked before the (slow) model load."""
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
        max_kv_size=args.max_kv_size,
    )
    check_generation_options(**options)
    return options


def cmd_generate(args: argparse.Namespace) -> None:
    options = generation_options(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = mlxfam.load(args.model, dtype=args.dtype)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    prompt = render_prompt(tokenizer, messages, use_chat_template=not args.no_chat_template)
    if args.verbose:
        print(tokenizer.decode(prompt), file=sys.stderr)
    response = None
    for response in mlxfam.stream_generate(model, tokenizer, prompt, **options):
        print(response.text, end="", flush=True)
    print(flush=True)
    if not args.quiet and response is not None:
        print("\n".join(stats_lines(response)), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    options = generation_options(args)
    model, tokenizer = mlxfam.load(args.model, dtype=args.dtype)
    max_kv_size = options.pop("max_kv_size")
    session = ChatSession(
        model, tokenizer, args.system, use_chat_template=not args.no_chat_template, max_kv_size=max_kv_size, **options
    )
    # Piped input: one turn per line and nothing on stdout but the replies.
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"mlxfam chat with {args.model}. Type a message; /help lists commands; /quit or Ctrl-D exits.",
            file=sys.stderr,
        )
    run_chat(session, terminal_lines() if interactive else sys.stdin, interactive=interactive, show_stats=args.verbose)


def cmd_list(args: argparse.Namespace) -> None:
    rows = [("ALIAS", "REPO", "DESCRIPTION", "DOWNLOADED")]
    for status in hub.list_models():
        rows.append((status.alias.name, status.alias.repo, status.alias.description, str(status.location or "no")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for *cells, location in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)), location, sep="  ")


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
    model, tokenizer = mlxfam.load(str(source), dtype=args.dtype)
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
    chat.set_defaults(run=cmd_chat)

    listing = commands.add_parser("list", help="list the model aliases and which are downloaded")
    listing.set_defaults(run=cmd_list)

    inspect = commands.add_parser(
        "inspect", help="print a model's modules, parameter count, dtypes, config and tokenizer"
    )
    add_model_flags(inspect)
    inspect.set_defaults(run=cmd_inspect)

    families = commands.add_parser("families", help="print how each supported family differs from Llama")
    families.add_argument("--markdown", action="store_true", help="print a Markdown table")
    families.set_defaults(run=cmd_families)
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
