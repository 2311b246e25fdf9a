"""Chat prompts of the families whose repositories build them in Python rather than with a jinja template.

Each format follows its family's original prompt code (Qwen's `make_context`, Baichuan's `build_chat_input`,
ChatGLM's `chat` / `build_prompt` / `build_chat_input`, InternLM's `build_inputs`, MiniCPM's `chat`), written
anew from those sources and FAMILIES.md; no code from a model repository is run. A format returns text where the
original writes text and tokenizes it as any input (so the tokenizer's BOS or `[gMASK] sop` are added), and token
ids where the original assembles ids itself.

`messages` are transformers-style dicts, {"role": ..., "content": ...}. The originals take (query, history)
pairs; a list of messages maps onto them turn by turn, and `add_generation_prompt` appends the opening of the
assistant's turn where the original ends with one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import MlxfamError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Qwen's `chat(system=...)` default (modeling_qwen.py).
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
# InternLM2's `chat(meta_instruction=...)` default (modeling_internlm2.py).
INTERNLM2_DEFAULT_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)


@dataclass(frozen=True)
class ChatFormat:
    """A named prompt builder: render(tokenizer, messages, add_generation_prompt, **options) -> text or ids."""

    name: str
    render: Callable[..., str | list[int]]
    options: Mapping[str, object] = field(default_factory=dict)  # per-repository values (Baichuan's role ids)
    uses_template: bool = False  # renders the repository's jinja template when it has one (MiniCPM's chat())

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


def _split_system(
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


def _rounds(turns: list[dict], format_name: str) -> tuple[list[tuple[str, str]], str | None]:
    """(question, answer) pairs and the trailing question (None when the last turn is an answer), for the
    formats whose original takes a history of rounds and a query."""
    roles = [message["role"] for message in turns]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise MlxfamError(f"the {format_name} format needs user and assistant turns alternating from a user turn")
    contents = [message["content"] for message in turns]
    query = contents.pop() if len(contents) % 2 else None
    return list(zip(contents[::2], contents[1::2])), query


# --- text formats (the original tokenizes the prompt text with the tokenizer's own special tokens) ----------


def _glm_rounds(history, query, *, first_round: int, sep: str) -> str:
    text = "".join(f"[Round {first_round + i}]{sep}问：{q}{sep}答：{a}{sep}" for i, (q, a) in enumerate(history))
    if query is not None:
        text += f"[Round {first_round + len(history)}]{sep}问：{query}{sep}答："
    return text


def _chatglm1(tokenizer, messages, add_generation_prompt) -> str:
    """ChatGLM-6B `chat()`: the bare query on the first turn, then "[Round i]\\n问：…\\n答：…" from round 0; a
    trailing question's round ends with "答：", which opens the answer."""
    _, turns = _split_system(messages, "ChatGLM-6B", ("user", "assistant"), takes_system=False)
    history, query = _rounds(turns, "ChatGLM-6B")
    if not history and query is not None:
        return query
    return _glm_rounds(history, query, first_round=0, sep="\n")


def _chatglm2(tokenizer, messages, add_generation_prompt) -> str:
    """ChatGLM2 `build_prompt`: "[Round i]\\n\\n问：…\\n\\n答：…" with rounds from 1, also on the first turn."""
    _, turns = _split_system(messages, "ChatGLM2", ("user", "assistant"), takes_system=False)
    return _glm_rounds(*_rounds(turns, "ChatGLM2"), first_round=1, sep="\n\n")


def _internlm(tokenizer, messages, add_generation_prompt) -> str:
    """InternLM `build_inputs`: "<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n", the prompt ending at "<|Bot|>:"."""
    _, turns = _split_system(messages, "InternLM", ("user", "assistant"), takes_system=False)
    text = "".join(
        f"<|User|>:{m['content']}<eoh>\n" if m["role"] == "user" else f"<|Bot|>:{m['content']}<eoa>\n" for m in turns
    )
    return text + "<|Bot|>:" if add_generation_prompt else text


def _internlm2(tokenizer, messages, add_generation_prompt, *, im_start: str, im_end: str) -> str:
    """InternLM2 `build_inputs`: ChatML with its meta instruction as system prompt (an empty one drops the block),
    and exactly one BOS: written here only when the tokenizer does not add it."""
    system, turns = _split_system(messages, "InternLM2", ("user", "assistant"))
    system = INTERNLM2_DEFAULT_SYSTEM if system is None else system
    text = "" if tokenizer.add_bos_token else tokenizer.bos_token or ""
    blocks = ([("system", system)] if system else []) + [(m["role"], m["content"]) for m in turns]
    text += "".join(f"{im_start}{role}\n{content}{im_end}\n" for role, content in blocks)
    return text + f"{im_start}assistant\n" if add_generation_prompt else text


def _minicpm(tokenizer, messages, add_generation_prompt) -> str:
    """The template MiniCPM ships: "<用户>{q}<AI>" per user turn, any other turn's text as is, both stripped."""
    return "".join(
        f"<用户>{m['content'].strip()}<AI>" if m["role"] == "user" else m["content"].strip() for m in messages
    )


# --- id formats (the original assembles token ids) -------------------------------------------------------


def _qwen(tokenizer, messages, add_generation_prompt) -> list[int]:
    """Qwen `make_context` (chatml): blocks "<|im_start|>{role}\\n{content}<|im_end|>" joined by "\\n", the system
    block first. Role and content are encoded separately, special-token text in them as plain text."""
    system, turns = _split_system(messages, "Qwen", ("user", "assistant"))
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    newline = tokenizer.encode_ordinary("\n")

    def block(role: str, content: str) -> list[int]:
        return [im_start, *tokenizer.encode_ordinary(role), *newline, *tokenizer.encode_ordinary(content), im_end]

    ids = block("system", QWEN_DEFAULT_SYSTEM if system is None else system)
    for message in turns:
        ids += newline + block(message["role"], message["content"])
    if add_generation_prompt:
        ids += [*newline, im_start, *tokenizer.encode_ordinary("assistant"), *newline]
    return ids


def _baichuan(tokenizer, messages, add_generation_prompt, *, user_token_id: int, assistant_token_id: int):
    """Baichuan `build_chat_input`: the system text, then each turn's role id and text, every text encoded as
    `tokenizer.encode` does (with BOS where the tokenizer adds one); a final assistant id opens the reply."""
    system, turns = _split_system(messages, "Baichuan", ("user", "assistant"))
    ids = tokenizer.encode(system or "")
    for message in turns:
        ids += [
            user_token_id if message["role"] == "user" else assistant_token_id,
            *tokenizer.encode(message["content"]),
        ]
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        ids.append(assistant_token_id)
    return ids


def _chatglm3(tokenizer, messages, add_generation_prompt) -> list[int]:
    """ChatGLM3 `build_chat_input`: per message <|role|> + encode(metadata + "\\n") + encode(content) (a system
    message's `tools` appended as JSON), <|assistant|> to open the reply, all after [gMASK] sop."""
    ids = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant", "observation"):
            raise MlxfamError(f"chat message {i}: role {role!r} is not supported by the ChatGLM3 format")
        if role == "system" and "tools" in message:
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids.append(tokenizer.token_to_id(f"<|{role}|>"))
        ids += tokenizer.encode_ordinary(f"{message.get('metadata', '')}\n") + tokenizer.encode_ordinary(content)
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id("<|assistant|>"))
    return tokenizer.build_inputs_with_special_tokens(ids)


QWEN = ChatFormat("qwen", _qwen)
BAICHUAN = ChatFormat("baichuan", _baichuan, {"user_token_id": 195, "assistant_token_id": 196})
CHATGLM1 = ChatFormat("chatglm1", _chatglm1)
CHATGLM2 = ChatFormat("chatglm2", _chatglm2)
CHATGLM3 = ChatFormat("chatglm3", _chatglm3)
INTERNLM = ChatFormat("internlm", _internlm)
INTERNLM2 = ChatFormat("internlm2", _internlm2, {"im_start": "<|im_start|>", "im_end": "<|im_end|>"})
# MiniCPM's chat() renders the repository's template to text and tokenizes that with BOS.
MINICPM = ChatFormat("minicpm", _minicpm, uses_template=True)

CHAT_FORMATS = {f.name: f for f in (QWEN, BAICHUAN, CHATGLM1, CHATGLM2, CHATGLM3, INTERNLM, INTERNLM2, MINICPM)}
