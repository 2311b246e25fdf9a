"""Chat prompts built in Python, for families whose repositories build them in code rather than with a jinja
template: the machinery here, each family's format in its family module (mlxfam/models/), written anew from the
original prompt code, which is never run. A format returns text where the original writes text and tokenizes it
as any input (so the tokenizer's own special tokens are added), and token ids where the original assembles ids
itself.

`messages` are transformers-style dicts, {"role": ..., "content": ...}. The originals take (query, history)
pairs; a list of messages maps onto them turn by turn, and `add_generation_prompt` appends the opening of the
assistant's turn where the original ends with one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import MlxfamError

if TYPE_CHECKING:
    from .tokenizer.core import Tokenizer


@dataclass(frozen=True)
class ChatFormat:
    """A named prompt builder: render(tokenizer, messages, add_generation_prompt, **options) -> text or ids."""

    name: str
    render: Callable[..., str | list[int]]
    options: Mapping[str, object] = field(default_factory=dict)  # per-repository values (e.g. token ids)
    uses_template: bool = False  # renders the repository's jinja template when it has one, like chat() does

    def with_options(self, **options) -> ChatFormat:
        return replace(self, options={**self.options, **options})

    def __call__(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool, **template_kwargs):
        if self.uses_template and tokenizer.chat_template is not None:
            return tokenizer.render_chat_template(messages, add_generation_prompt, **template_kwargs)
        given = sorted(name for name, value in template_kwargs.items() if value is not None)
        if given:
            raise MlxfamError(f"the {self.name} chat format takes no template arguments (got {', '.join(given)})")
        _check_messages(messages)
        return self.render(tokenizer, messages, add_generation_prompt, **self.options)


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise MlxfamError("a chat prompt needs at least one message")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise MlxfamError(f"chat message {i} must be a dict with a text 'role' and 'content', got {message!r}")


def split_system(
    messages: list[dict], format_name: str, roles: tuple[str, ...], takes_system: bool = True
) -> tuple[str | None, list[dict]]:
    """The leading system message's content (None without one) and the other messages, whose roles must be
    among `roles`."""
    system = messages[0]["content"] if takes_system and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    for i, message in enumerate(turns, start=len(messages) - len(turns)):
        if message["role"] == "system":
            where = "as the first message" if takes_system else "at all"
            raise MlxfamError(f"chat message {i}: the {format_name} format takes no system message {where}")
        if message["role"] not in roles:
            raise MlxfamError(
                f"chat message {i}: role {message['role']!r} is not supported by the {format_name} format "
                f"(supported: {', '.join(('system',) * takes_system + roles)})"
            )
    return system, turns


def rounds(turns: list[dict], format_name: str) -> tuple[list[tuple[str, str]], str | None]:
    """(question, answer) pairs and the trailing question (None when the last turn is an answer), for the
    formats whose original takes a history of rounds and a query."""
    roles = [message["role"] for message in turns]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise MlxfamError(f"the {format_name} format needs user and assistant turns alternating from a user turn")
    contents = [message["content"] for message in turns]
    query = contents.pop() if len(contents) % 2 else None
    return list(zip(contents[::2], contents[1::2])), query
