"""The tokenizer every reader builds: a `Vocabulary` (an encoder plus the bytes every id decodes to) behind one
`Tokenizer` interface, and the streaming detokenizer. Decoding is always "join the bytes, then UTF-8", so `decode`
and the streaming detokenizer agree by construction."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..chat_formats import ChatFormat
from ..chat_template import render_chat_template
from ..errors import MlxfamError


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are written in."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, n_shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + n_shifted))
            n_shifted += 1
    return chars


BYTE_CHARS = _byte_level_chars()
_CHAR_BYTES = {char: byte for byte, char in enumerate(BYTE_CHARS)}


@dataclass(frozen=True)
class Vocabulary:
    """One tokenizer file, reduced to what encoding and decoding need."""

    encode_ordinary: Callable[[str], list[int]]  # text -> ids, with `specials` already split out
    pieces: list[bytes]  # id -> the bytes it decodes to
    vocab: dict[str, int]
    specials: dict[str, int] = field(default_factory=dict)  # strings matched as one token before encode_ordinary
    special_ids: frozenset[int] = frozenset()  # ids that decode(skip_special_tokens=True) drops
    strip_leading_space: bool = False  # SentencePiece dummy prefix: decoded text loses one leading space
    # Writes the file this vocabulary is read back from into a directory, for a Tokenizer; returns the
    # tokenizer_config.json entries that file needs. None: not savable (tiktoken, SentencePiece + added tokens).
    save: Callable[[Path, Tokenizer], dict] | None = None


class StreamingDetokenizer:
    """Turns ids into text one at a time; the pieces it returns add up to `Tokenizer.decode(tokens)`."""

    def __init__(self, piece_bytes: Callable[[int], bytes], strip_leading_space: bool):
        self._piece_bytes = piece_bytes
        self._strip_leading_space = strip_leading_space
        # Holds back an incomplete UTF-8 sequence until the bytes that finish it arrive.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self.text = ""
        self.tokens: list[int] = []

    def add_token(self, token_id: int) -> str:
        """The text that `token_id` completes (possibly empty)."""
        self.tokens.append(token_id)
        return self._emit(self._utf8.decode(self._piece_bytes(token_id)))

    def finalize(self) -> str:
        """Whatever is still held back (a truncated character becomes U+FFFD, as in `decode`)."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, new_text: str) -> str:
        if new_text and self._at_start:
            self._at_start = False
            if self._strip_leading_space and new_text.startswith(" "):
                new_text = new_text[1:]
        self.text += new_text
        return new_text


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens, the ids generation stops on, the chat prompt
    (a jinja chat template, or the built-in chat format of a family whose repository builds prompts in Python)."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        prefix_ids: list[int],
        suffix_ids: list[int],
        chat_template: str | None,
        chat_format: ChatFormat | None = None,
    ):
        """`prefix_ids`/`suffix_ids`: what `encode(add_special_tokens=True)` puts around the text (BOS, EOS).
        `chat_format`: builds chat prompts in place of `chat_template` (see mlxfam.chat_formats)."""
        self._vocabulary = vocabulary
        self._id_to_token = {i: token for token, i in vocabulary.vocab.items()}
        longest_first = sorted(vocabulary.specials, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        self._prefix_ids, self._suffix_ids = list(prefix_ids), list(suffix_ids)
        self.bos_token_id = bos_token_id
        self.bos_token = self._id_to_token.get(bos_token_id)
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = self._id_to_token.get(self.eos_token_id)
        self.chat_template = chat_template
        self.chat_format = chat_format
        self.vocab_size = len(vocabulary.pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. `add_special_tokens` adds the
        BOS/EOS the tokenizer config asks for."""
        ids = self._encode_text(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings in it encoded as plain text (a tokenizer.json vocabulary
        still matches its added tokens, inside `tokenizers`)."""
        return self._vocabulary.encode_ordinary(text)

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        """`ids` with the special tokens `encode(add_special_tokens=True)` puts around a text."""
        return self._prefix_ids + list(ids) + self._suffix_ids

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(add_special_tokens=True)` starts a text with BOS."""
        return self.bos_token_id is not None and self._prefix_ids[:1] == [self.bos_token_id]

    def token_to_id(self, token: str) -> int:
        if token not in self._vocabulary.vocab:
            raise MlxfamError(f"{token!r} is not a token of this tokenizer's vocabulary")
        return self._vocabulary.vocab[token]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (an int, a list or an array); ids outside the vocabulary decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        skipped = self._vocabulary.special_ids if skip_special_tokens else frozenset()
        text = b"".join(self._piece_bytes(i) for i in ids if i not in skipped).decode("utf-8", errors="replace")
        return text[1:] if self._vocabulary.strip_leading_space and text.startswith(" ") else text

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocabulary.vocab)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes tokenizer.json (a SentencePiece vocabulary: tokenizer.model) and tokenizer_config.json
        (special tokens, BOS/EOS added by encode, chat template), which mlxfam, transformers and mlx-lm
        load back to the same ids."""
        if self._vocabulary.save is None:
            raise MlxfamError(
                "this tokenizer (tiktoken-based, or SentencePiece with added tokens) cannot be saved: "
                "copy its original files instead"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self._vocabulary.save(directory, self)
        config |= {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True, **kwargs
    ) -> list[int] | str:
        """The chat prompt for `messages` (transformers' semantics): token ids, or the text when `tokenize` is
        False. `kwargs` (tools, documents, enable_thinking, ...) reach a jinja template. A chat format that
        assembles ids gives, untokenized, the text of those ids."""
        if self.chat_format is not None:
            prompt = self.chat_format(self, messages, add_generation_prompt, **kwargs)
            if isinstance(prompt, str):
                # The family's chat code tokenizes its prompt text like any input: with BOS or [gMASK] sop.
                return self.encode(prompt) if tokenize else prompt
            return prompt if tokenize else self.decode(prompt)
        if self.chat_template is None:
            raise MlxfamError("this model has no chat template: format the prompt yourself or pass plain text")
        text = self.render_chat_template(messages, add_generation_prompt, **kwargs)
        # The template writes BOS itself where the model wants one, so none is added here.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The jinja chat template's text for `messages`; `kwargs` become template variables."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **(variables | kwargs)
        )

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self._piece_bytes, self._vocabulary.strip_leading_space)

    def _piece_bytes(self, token_id: int) -> bytes:
        pieces = self._vocabulary.pieces
        return pieces[token_id] if 0 <= token_id < len(pieces) else b""

    def _encode_text(self, text: str) -> list[int]:
        encode_ordinary = self._vocabulary.encode_ordinary
        if self._special_pattern is None:
            return encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_pattern.finditer(text):
            if match.start() > start:
                ids += encode_ordinary(text[start : match.start()])
            ids.append(self._vocabulary.specials[match.group()])
            start = match.end()
        if start < len(text):
            ids += encode_ordinary(text[start:])
        return ids


@dataclass
class FileDefaults:
    """What a tokenizer file implies before tokenizer_config.json and the other configs have their say."""

    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # further end-of-generation ids
    prefix_ids: list[int] = field(default_factory=list)  # what encode(add_special_tokens=True) adds
    suffix_ids: list[int] = field(default_factory=list)
    chat_format: ChatFormat | None = None  # the family's built-in chat prompt, where its repository has one


@dataclass(frozen=True)
class TokenizerSource:
    """A model directory's tokenizer inputs, as a family's tokenizer rules read them."""

    path: Path
    config: dict  # tokenizer_config.json ({} without one)
    model_config: dict  # config.json ({} without one)

    @property
    def config_file(self) -> Path:
        return self.path / "tokenizer_config.json"

    def json(self, name: str) -> dict:
        """Another JSON file of the directory ({} without it)."""
        return read_json(self.path / name)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxfamError(f"{path}: not valid JSON ({e})") from None


def token_id_of(vocabulary: Vocabulary, value: str | dict | None, where: str) -> int | None:
    """The id of a token given as a string or as a serialized AddedToken {"content": ...}; None stays None."""
    content = value["content"] if isinstance(value, dict) else value
    if content is None:
        return None
    if content not in vocabulary.vocab:
        raise MlxfamError(f"{where} = {content!r} is not a token of the vocabulary")
    return vocabulary.vocab[content]


def added_if(enabled: bool, token_id: int | None, where: str) -> list[int]:
    """[token_id] when a config flag (add_bos_token, add_eos_token) asks for the token, else []."""
    if enabled and token_id is None:
        raise MlxfamError(f"{where} is true but the tokenizer has no such token")
    return [token_id] if enabled else []


def added_tokens(config: dict, source: Path) -> dict[int, tuple[str, bool]]:
    try:
        return {
            int(i): (t["content"], bool(t.get("special", False)))
            for i, t in config.get("added_tokens_decoder", {}).items()
        }
    except (ValueError, TypeError, KeyError):
        raise MlxfamError(
            f"{source}: added_tokens_decoder must map ids to {{'content': ..., 'special': ...}}"
        ) from None


def with_added_tokens(vocabulary: Vocabulary, added: dict[int, tuple[str, bool]]) -> Vocabulary:
    """Adds tokenizer_config.json's `added_tokens_decoder` ({id: (content, special)}) to a vocabulary whose own
    file lacks them (SentencePiece, tiktoken). An id inside the vocabulary takes the new content."""
    if not added:
        return vocabulary
    pieces = vocabulary.pieces + [b""] * (max(added) + 1 - len(vocabulary.pieces))
    for i, (content, _) in added.items():
        pieces[i] = content.encode()
    return Vocabulary(
        encode_ordinary=vocabulary.encode_ordinary,
        pieces=pieces,
        vocab=vocabulary.vocab | {content: i for i, (content, _) in added.items()},
        specials=vocabulary.specials | {content: i for i, (content, _) in added.items()},
        special_ids=vocabulary.special_ids | {i for i, (_, special) in added.items() if special},
        strip_leading_space=vocabulary.strip_leading_space,
    )


def with_appended_tokens(vocabulary: Vocabulary, names: tuple[str, ...]) -> Vocabulary:
    """`names` as ids after the vocabulary's own, for decoding and lookup only (never matched in text)."""
    appended = {name: len(vocabulary.pieces) + i for i, name in enumerate(names)}
    return Vocabulary(
        encode_ordinary=vocabulary.encode_ordinary,
        pieces=vocabulary.pieces + [name.encode() for name in names],
        vocab=vocabulary.vocab | appended,
        specials=vocabulary.specials,
        special_ids=vocabulary.special_ids | frozenset(appended.values()),
        strip_leading_space=vocabulary.strip_leading_space,
    )


def vocabulary_id(vocabulary: Vocabulary, value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(vocabulary.pieces):
        raise MlxfamError(f"{where} = {value!r} is not a token id of the vocabulary ({len(vocabulary.pieces)} ids)")
    return value


def required_token(vocabulary: Vocabulary, token: str, path: Path, family: str) -> int:
    if token not in vocabulary.vocab:
        raise MlxfamError(f"{path}: {family}'s chat needs the token {token!r}, which the vocabulary lacks")
    return vocabulary.vocab[token]


def token_text(vocabulary: Vocabulary, token_id: int, path: Path, family: str) -> str:
    # The last name wins: tokenizer_config.json's added tokens rename pieces of the vocabulary file.
    text = next((token for token, i in reversed(vocabulary.vocab.items()) if i == token_id), None)
    if text is None:
        raise MlxfamError(f"{path}: {family}'s chat needs token id {token_id}, which the vocabulary lacks")
    return text
