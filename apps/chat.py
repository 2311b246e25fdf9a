"""The chat app: a session (history, system prompt, one KV cache kept across turns) and its loop.

Each turn renders the whole conversation. When that rendering extends what the cache already
holds token for token, only the new tokens are prefilled; otherwise the cache is rebuilt (a chat
template may, say, strip the reply it re-renders, so the ids no longer match what was generated).
With a prompt-cache file the session resumes the conversation and cache saved there (when they
were made with the same model and cache settings) and saves both after each turn.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import mlxfam
from mlxfam.cache import CacheOptions
from mlxfam.errors import MlxfamError

COMMANDS = "/reset clears the conversation, /system TEXT sets the system prompt (no TEXT: none), /quit exits"


def render_prompt(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids for a conversation: the chat template (or built-in chat format) when there is one, else the
    bare texts."""
    if use_chat_template and (tokenizer.chat_template is not None or tokenizer.chat_format is not None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode("\n\n".join(message["content"] for message in messages)))


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        *,
        use_chat_template: bool = True,
        cache_options: CacheOptions | None = None,
        prompt_cache: str | os.PathLike | None = None,
        **generation_kwargs,
    ):
        """`generation_kwargs` go to `mlxfam.stream_generate` (temp, max_tokens, stop, ...);
        `cache_options` to `model.make_cache` (default: CacheOptions()). `prompt_cache`: a file to resume from (if it exists)
        and to save to after each turn."""
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.use_chat_template = use_chat_template
        self.cache_options = cache_options or CacheOptions()
        self.generation_kwargs = generation_kwargs
        self.messages: list[dict] = []
        self.cache = None
        self.cache_ids: list[int] = []  # every id fed to `cache`, in order
        self.prompt_cache = Path(prompt_cache) if prompt_cache is not None else None
        if self.prompt_cache is not None and self.prompt_cache.exists():
            self.resume()

    def resume(self) -> None:
        """Continue the conversation saved in the prompt-cache file (its system prompt too, unless one was given)."""
        self.cache, saved = mlxfam.load_prompt_cache(self.prompt_cache, self.model, self.cache_options)
        chat = saved.get("chat")
        if chat is None:
            raise MlxfamError(
                f"prompt cache {self.prompt_cache} holds no conversation (it was not saved by mlxfam chat)"
            )
        self.messages, self.cache_ids = chat["messages"], chat["cache_ids"]
        if self.system is None:
            self.system = chat["system"]

    def save(self) -> None:
        chat = {"messages": self.messages, "cache_ids": self.cache_ids, "system": self.system}
        mlxfam.save_prompt_cache(self.prompt_cache, self.cache, self.model, {"chat": chat})

    def reset(self) -> None:
        self.messages = []
        self.cache, self.cache_ids = None, []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return render_prompt(self.tokenizer, system + messages, self.use_chat_template)

    def held_ids(self) -> list[int]:
        """The ids whose keys and values the cache holds (empty when there is no usable cache)."""
        if self.cache is None:
            return []
        offsets = {layer.offset for layer in self.cache}
        held = offsets.pop() if len(offsets) == 1 else None
        # Layers that disagree (an interrupt mid-forward) or more tokens than we fed: unusable.
        if held is None or held > len(self.cache_ids):
            return []
        return self.cache_ids[:held]

    def ids_to_prefill(self, ids: list[int]) -> list[int]:
        """The suffix of `ids` the cache lacks; rebuilds the cache when `ids` does not extend it."""
        held = self.held_ids()
        if held and len(ids) > len(held) and ids[: len(held)] == held:
            return ids[len(held) :]
        self.cache = self.model.make_cache(self.cache_options)
        return ids

    def send(self, text: str, on_text: Callable[[str], None] = lambda piece: None):
        """Answer `text`, streaming the reply through `on_text`; returns the last GenerationResponse.

        The reply (or the part of it produced before an interrupt) joins the history; a finished
        turn is saved to the prompt-cache file.
        """
        user = {"role": "user", "content": text}
        ids = self.prompt_ids(self.messages + [user])
        new_ids = self.ids_to_prefill(ids)
        # Raises on bad arguments or a context overflow before any work, leaving the history as it was.
        responses = mlxfam.stream_generate(
            self.model,
            self.tokenizer,
            new_ids,
            cache=self.cache,
            max_kv_size=self.cache_options.max_kv_size,
            **self.generation_kwargs,
        )
        self.messages.append(user)
        pieces, generated, last = [], [], None
        try:
            for last in responses:
                generated.append(last.token)
                pieces.append(last.text)
                on_text(last.text)
        finally:
            self.cache_ids = ids + generated
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if self.prompt_cache is not None:
            self.save()
        return last


def stats_lines(response) -> list[str]:
    return [
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {response.peak_memory:.3f} GB",
    ]


def terminal_lines() -> Iterator[str]:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    while True:
        try:
            yield input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the chat
            print(file=sys.stderr)
            return


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    *,
    interactive: bool,
    show_stats: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> None:
    """One user turn per line; replies go to `out`. Non-interactive runs print nothing else to `out`."""
    out, err = out or sys.stdout, err or sys.stderr

    def note(message: str) -> None:
        if interactive:
            print(message, file=err)

    for line in lines:
        text = line.strip()
        command, _, argument = text.partition(" ")
        if not text:
            continue
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            note("(conversation cleared)")
        elif command == "/system":
            session.system = argument.strip() or None
            note(f"(system prompt: {session.system or 'none'})")
        elif command == "/help":
            print(f"commands: {COMMANDS}", file=err)
        elif command.startswith("/"):
            print(f"mlxfam: unknown command {command}; commands: {COMMANDS}", file=err)
        else:
            try:
                response = session.send(text, on_text=lambda piece: print(piece, end="", file=out, flush=True))
            except (KeyboardInterrupt, MlxfamError) as error:
                if not interactive:
                    raise
                # Ctrl-C stops this reply, and an error (say, a full context) this turn, not the chat.
                if isinstance(error, MlxfamError):
                    print(f"mlxfam: error: {error}", file=err)
                response = None
            print(file=out, flush=True)
            if show_stats and response is not None:
                print("\n".join(stats_lines(response)), file=err)
