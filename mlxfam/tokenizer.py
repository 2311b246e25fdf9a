"""Text <-> token ids for every supported family, behind one interface.

Sources: a Hugging Face `tokenizer.json` (run by `tokenizers`), a SentencePiece `tokenizer.model`, a tiktoken
BPE file (Qwen 1's `qwen.tiktoken`, Llama 3's original `tokenizer.model`) and a GGUF vocabulary. Each becomes a
`_Vocabulary`: an encoder plus the bytes every id decodes to. Decoding is always "join the bytes, then UTF-8",
so `decode` and the streaming detokenizer agree by construction. No Python file from a model repo is run.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from .chat_template import render_chat_template
from .errors import MlxfamError


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


_BYTE_CHARS = _byte_level_chars()
_CHAR_BYTES = {char: byte for byte, char in enumerate(_BYTE_CHARS)}


@dataclass(frozen=True)
class _Vocabulary:
    """One tokenizer file, reduced to what encoding and decoding need."""

    encode_ordinary: Callable[[str], list[int]]  # text -> ids, with `specials` already split out
    pieces: list[bytes]  # id -> the bytes it decodes to
    vocab: dict[str, int]
    specials: dict[str, int] = field(default_factory=dict)  # strings matched as one token before encode_ordinary
    special_ids: frozenset[int] = frozenset()  # ids that decode(skip_special_tokens=True) drops
    strip_leading_space: bool = False  # SentencePiece dummy prefix: decoded text loses one leading space


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
    """A model's tokenizer: encode/decode, special tokens, the ids generation stops on, the chat template."""

    def __init__(
        self,
        vocabulary: _Vocabulary,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        prefix_ids: list[int],
        suffix_ids: list[int],
        chat_template: str | None,
    ):
        """`prefix_ids`/`suffix_ids`: what `encode(add_special_tokens=True)` puts around the text (BOS, EOS)."""
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
        self.vocab_size = len(vocabulary.pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. `add_special_tokens` adds the
        BOS/EOS the tokenizer config asks for."""
        ids = self._encode_text(text)
        return self._prefix_ids + ids + self._suffix_ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (an int, a list or an array); ids outside the vocabulary decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        skipped = self._vocabulary.special_ids if skip_special_tokens else frozenset()
        text = b"".join(self._piece_bytes(i) for i in ids if i not in skipped).decode("utf-8", errors="replace")
        return text[1:] if self._vocabulary.strip_leading_space and text.startswith(" ") else text

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocabulary.vocab)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True, **kwargs
    ) -> list[int] | str:
        """The chat template rendered for `messages` (transformers' semantics): token ids, or the text when
        `tokenize` is False. `kwargs` (tools, documents, enable_thinking, ...) reach the template."""
        if self.chat_template is None:
            raise MlxfamError("this model has no chat template: format the prompt yourself or pass plain text")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **(variables | kwargs)
        )
        # The template writes BOS itself where the model wants one, so none is added here.
        return self.encode(text, add_special_tokens=False) if tokenize else text

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


# --- Hugging Face tokenizer.json (also the engine for GGUF byte-level BPE) -------------------------------


def _tokenizers_vocabulary(tokenizer: tokenizers.Tokenizer, source: str) -> _Vocabulary:
    """`tokenizers` splits its added tokens itself, so `specials` stays empty here."""
    decoder = json.loads(tokenizer.decoder.__getstate__()) if tokenizer.decoder is not None else {"type": None}
    steps = decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]
    kinds = {step["type"] for step in steps}
    if "ByteLevel" in kinds:
        piece_bytes = _byte_level_bytes
    elif kinds & {"Replace", "Metaspace"}:  # SentencePiece-style: "▁" is a space
        byte_fallback = "ByteFallback" in kinds
        piece_bytes = lambda token: _metaspace_bytes(token, byte_fallback)  # noqa: E731
    else:
        raise MlxfamError(f"{source}: tokenizer decoder {sorted(map(str, kinds))} is not supported")
    strip_leading_space = any(
        (step["type"] == "Strip" and step["start"] > 0)
        or (step["type"] == "Metaspace" and step.get("prepend_scheme", "always") != "never")
        for step in steps
    )

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    pieces = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        pieces[i] = added[i].content.encode() if i in added else piece_bytes(token)
    return _Vocabulary(
        encode_ordinary=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        pieces=pieces,
        vocab=vocab,
        special_ids=frozenset(i for i, token in added.items() if token.special),
        strip_leading_space=strip_leading_space,
    )


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_CHAR_BYTES[char] for char in token)
    except KeyError:  # not written in the byte alphabet: `tokenizers` passes such tokens through as text
        return token.encode()


def _metaspace_bytes(token: str, byte_fallback: bool) -> bytes:
    if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


def _post_processor_ids(tokenizer: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer.json post-processor puts before and after a text."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    wrapped = tokenizer.encode("a").ids
    start = next(i for i in range(len(wrapped)) if wrapped[i : i + len(bare)] == bare)
    return wrapped[:start], wrapped[start + len(bare) :]


# --- SentencePiece ------------------------------------------------------------------------------------


def _sentencepiece_processor(model_proto: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
        raise MlxfamError(f"{source}: not a valid SentencePiece model ({e})") from None


def _sentencepiece_vocabulary(processor: sentencepiece.SentencePieceProcessor) -> _Vocabulary:
    ids = list(range(processor.get_piece_size()))
    texts = processor.id_to_piece(ids)
    is_byte, is_control, is_unknown = processor.is_byte(ids), processor.is_control(ids), processor.is_unknown(ids)
    pieces = [
        bytes([int(text[3:5], 16)]) if byte else text.replace("▁", " ").encode() for text, byte in zip(texts, is_byte)
    ]
    # SentencePiece never matches control pieces (<s>, </s>) in text; HF and llama.cpp parse them as specials.
    specials = {texts[i]: i for i in ids if is_control[i] or is_unknown[i]}
    # Whether decode drops a first piece's "▁" (add_dummy_prefix / remove_extra_whitespaces): ask SentencePiece.
    spaced = next((i for i in ids if texts[i].startswith("▁") and not (is_byte[i] or is_control[i])), None)
    return _Vocabulary(
        # Each text segment between special tokens gets its own dummy prefix, as in llama.cpp and HF (legacy).
        encode_ordinary=processor.encode,
        pieces=pieces,
        vocab={text: i for i, text in enumerate(texts)},
        specials=specials,
        special_ids=frozenset(specials.values()),
        strip_leading_space=spaced is not None and processor.decode([spaced]) != pieces[spaced].decode(),
    )


def _with_added_tokens(vocabulary: _Vocabulary, added: dict[int, tuple[str, bool]]) -> _Vocabulary:
    """Adds tokenizer_config.json's `added_tokens_decoder` ({id: (content, special)}) to a vocabulary whose own
    file lacks them (SentencePiece, tiktoken). An id inside the vocabulary takes the new content."""
    if not added:
        return vocabulary
    pieces = vocabulary.pieces + [b""] * (max(added) + 1 - len(vocabulary.pieces))
    for i, (content, _) in added.items():
        pieces[i] = content.encode()
    return _Vocabulary(
        encode_ordinary=vocabulary.encode_ordinary,
        pieces=pieces,
        vocab=vocabulary.vocab | {content: i for i, (content, _) in added.items()},
        specials=vocabulary.specials | {content: i for i, (content, _) in added.items()},
        special_ids=vocabulary.special_ids | {i for i, (_, special) in added.items() if special},
        strip_leading_space=vocabulary.strip_leading_space,
    )


# --- tiktoken -----------------------------------------------------------------------------------------

# Qwen 1 (tokenization_qwen.py PAT_STR); Qwen 1.5/2's tokenizer.json uses the same one.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 (Meta's tokenizer.py pat_str): as Qwen's but digits go in runs of up to three.
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-2 (encoder.py), as llama.cpp writes it.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class _TiktokenFamily:
    """What a family's own tokenizer code (never run here) builds around its tiktoken ranks."""

    name: str
    n_ranks: int
    pattern: str
    specials: tuple[str, ...]  # ids n_ranks, n_ranks + 1, ...
    bos: str | None
    eos: str
    stops: tuple[str, ...]  # further tokens generation ends on
    nfc: bool  # the text is NFC-normalised before encoding


_QWEN1 = _TiktokenFamily(
    name="Qwen 1",
    n_ranks=151643,
    pattern=_QWEN_PATTERN,
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))),
    bos=None,
    eos="<|endoftext|>",
    stops=("<|im_end|>", "<|im_start|>"),  # FAMILIES.md §10: chat stop words
    nfc=True,
)
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip
_LLAMA3 = _TiktokenFamily(
    name="Llama 3",
    n_ranks=128000,
    pattern=_LLAMA3_PATTERN,
    # Meta's Llama 3.1 tokenizer.py: the named tokens, then reserved ones up to 256 in all.
    specials=_LLAMA3_NAMED_SPECIALS + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)),
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    stops=("<|eom_id|>", "<|eot_id|>"),
    nfc=False,
)


def _tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """The ranks of a tiktoken BPE file (lines "<base64 token> <rank>"), or None when `data` is not one."""
    try:
        return {
            base64.b64decode(token, validate=True): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
    except ValueError:  # also binascii.Error, and a SentencePiece protobuf's first "line"
        return None


def _tiktoken_vocabulary(ranks: dict[bytes, int], family: _TiktokenFamily, source: Path) -> _Vocabulary:
    if len(ranks) != family.n_ranks:
        raise MlxfamError(f"{source}: {len(ranks)} BPE ranks, but {family.name}'s tokenizer has {family.n_ranks}")
    specials = {token: family.n_ranks + i for i, token in enumerate(family.specials)}
    encoding = tiktoken.Encoding(family.name, pat_str=family.pattern, mergeable_ranks=ranks, special_tokens=specials)
    pieces = [b""] * (family.n_ranks + len(specials))
    for token, rank in ranks.items():
        pieces[rank] = token
    for token, i in specials.items():
        pieces[i] = token.encode()
    # Vocabulary strings in the byte alphabet, as in the tokenizer.json HF derives from these files.
    vocab = {"".join(_BYTE_CHARS[b] for b in token): rank for token, rank in ranks.items()} | specials
    if family.nfc:
        encode_ordinary = lambda text: encoding.encode_ordinary(unicodedata.normalize("NFC", text))  # noqa: E731
    else:
        encode_ordinary = encoding.encode_ordinary
    return _Vocabulary(encode_ordinary, pieces, vocab, specials=specials, special_ids=frozenset(specials.values()))


# --- local model directories --------------------------------------------------------------------------


@dataclass
class _FileDefaults:
    """What a tokenizer file implies before tokenizer_config.json and the other configs have their say."""

    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # further end-of-generation ids
    prefix_ids: list[int] = field(default_factory=list)  # what encode(add_special_tokens=True) adds
    suffix_ids: list[int] = field(default_factory=list)


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no tokenizer files."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file)
    model_files = [path / "tokenizer.model", *sorted(path.glob("*.tiktoken"))]
    if (path / "tokenizer.json").is_file():
        vocabulary, defaults = _read_tokenizer_json(path / "tokenizer.json")
    elif any(f.is_file() for f in model_files):
        vocabulary, defaults = _read_bpe_model(next(f for f in model_files if f.is_file()))
        vocabulary = _with_added_tokens(vocabulary, _added_tokens(config, config_file))
    elif (path / "merges.txt").is_file():
        raise MlxfamError(f"{path}: vocab.json/merges.txt without a tokenizer.json is not supported")
    else:
        return None

    bos_id, eos_id = defaults.bos_id, defaults.eos_id
    # tokenizer_config.json wins over special_tokens_map.json, which wins over the file's own defaults.
    for source in (path / "special_tokens_map.json", config_file):
        settings = _read_json(source)
        if "bos_token" in settings:
            bos_id = _token_id(vocabulary, settings["bos_token"], f"{source}: bos_token")
        if "eos_token" in settings:
            eos_id = _token_id(vocabulary, settings["eos_token"], f"{source}: eos_token")
    prefix, suffix = defaults.prefix_ids, defaults.suffix_ids
    if config.get("add_bos_token") is not None:
        prefix = _added_if(config["add_bos_token"], bos_id, f"{config_file}: add_bos_token")
    if config.get("add_eos_token") is not None:
        suffix = _added_if(config["add_eos_token"], eos_id, f"{config_file}: add_eos_token")

    eos_ids = [
        *([eos_id] if eos_id is not None else []),
        *defaults.stop_ids,
        *_id_list(_read_json(path / "generation_config.json").get("eos_token_id"), path / "generation_config.json"),
        *_id_list(_read_json(path / "config.json").get("eos_token_id"), path / "config.json"),
    ]
    return Tokenizer(
        vocabulary,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        prefix_ids=prefix,
        suffix_ids=suffix,
        chat_template=_chat_template(path, config),
    )


def _read_tokenizer_json(file: Path) -> tuple[_Vocabulary, _FileDefaults]:
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # `tokenizers` raises bare Exceptions
        raise MlxfamError(f"{file}: not a tokenizer.json the tokenizers library can read ({e})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    prefix, suffix = _post_processor_ids(tokenizer)
    return _tokenizers_vocabulary(tokenizer, str(file)), _FileDefaults(prefix_ids=prefix, suffix_ids=suffix)


def _read_bpe_model(file: Path) -> tuple[_Vocabulary, _FileDefaults]:
    """A SentencePiece tokenizer.model, Llama 3's tiktoken-format tokenizer.model, or Qwen 1's qwen.tiktoken."""
    data = file.read_bytes()
    ranks = _tiktoken_ranks(data)
    if ranks is None and file.name == "tokenizer.model":
        processor = _sentencepiece_processor(data, str(file))
        bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
        eos_id = processor.eos_id() if processor.eos_id() >= 0 else None
        # HF's LlamaTokenizer and llama.cpp add BOS for SentencePiece models unless told otherwise.
        defaults = _FileDefaults(bos_id, eos_id, prefix_ids=[bos_id] if bos_id is not None else [])
        return _sentencepiece_vocabulary(processor), defaults
    if ranks is not None and file.name in ("tokenizer.model", "qwen.tiktoken"):
        family = _LLAMA3 if file.name == "tokenizer.model" else _QWEN1
        vocabulary = _tiktoken_vocabulary(ranks, family, file)
        bos_id = vocabulary.specials.get(family.bos)
        defaults = _FileDefaults(
            bos_id,
            vocabulary.specials[family.eos],
            stop_ids=[vocabulary.specials[token] for token in family.stops],
            prefix_ids=[bos_id] if bos_id is not None else [],
        )
        return vocabulary, defaults
    raise MlxfamError(
        f"{file}: not a known tokenizer file (a SentencePiece model, Llama 3's or Qwen 1's tiktoken file)"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxfamError(f"{path}: not valid JSON ({e})") from None


def _token_id(vocabulary: _Vocabulary, value: str | dict | None, where: str) -> int | None:
    """The id of a token given as a string or as a serialized AddedToken {"content": ...}; None stays None."""
    content = value["content"] if isinstance(value, dict) else value
    if content is None:
        return None
    if content not in vocabulary.vocab:
        raise MlxfamError(f"{where} = {content!r} is not a token of the vocabulary")
    return vocabulary.vocab[content]


def _added_if(enabled: bool, token_id: int | None, where: str) -> list[int]:
    """[token_id] when a config flag (add_bos_token, add_eos_token) asks for the token, else []."""
    if enabled and token_id is None:
        raise MlxfamError(f"{where} is true but the tokenizer has no such token")
    return [token_id] if enabled else []


def _id_list(value, source: Path) -> list[int]:
    """An `eos_token_id` field: absent, one id or a list of ids."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise MlxfamError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def _added_tokens(config: dict, source: Path) -> dict[int, tuple[str, bool]]:
    try:
        return {
            int(i): (t["content"], bool(t.get("special", False)))
            for i, t in config.get("added_tokens_decoder", {}).items()
        }
    except (ValueError, TypeError, KeyError):
        raise MlxfamError(
            f"{source}: added_tokens_decoder must map ids to {{'content': ..., 'special': ...}}"
        ) from None


def _chat_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json."""
    template = config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: the plain chat one is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None:
            raise MlxfamError(f"{path / 'tokenizer_config.json'}: chat_template list has no 'default' template")
    return template


# --- GGUF ---------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes per `tokenizer.ggml.pre` (src/llama-vocab.cpp), applied one after another;
# where llama.cpp rewrote a tokenizer.json regex for its own engine, the original is used (onig runs it).
_GGUF_PRE_PATTERNS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_PATTERN, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3_PATTERN],
    "llama-v3": [_LLAMA3_PATTERN],
    "llama-bpe": [_LLAMA3_PATTERN],
    "falcon3": [_LLAMA3_PATTERN],
    "dbrx": [_LLAMA3_PATTERN],
    "smaug-bpe": [_LLAMA3_PATTERN],
    "gpt-2": [_GPT2_PATTERN],
    "phi-2": [_GPT2_PATTERN],
    "mpt": [_GPT2_PATTERN],
    "olmo": [_GPT2_PATTERN],
    "starcoder": [r"\p{N}", _GPT2_PATTERN],
    "refact": [r"\p{N}", _GPT2_PATTERN],
    "smollm": [r"\p{N}", _GPT2_PATTERN],
    "codeshell": [r"\p{N}", _GPT2_PATTERN],
    "command-r": [r"\p{N}", _GPT2_PATTERN],
    "qwen2": [_QWEN_PATTERN],
    "deepseek-r1-qwen": [_QWEN_PATTERN],
    "megrez": [_QWEN_PATTERN],
    "stablelm2": [_QWEN_PATTERN],
}
# llama.cpp sets ignore_merges (a whole pre-token found in the vocabulary is one token) and add_bos for these.
_GGUF_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}
# Qwen 2's own tokenizer NFC-normalises its input (llama.cpp does not).
_GGUF_NFC_PRES = {"qwen2", "deepseek-r1-qwen", "megrez"}
# Token texts llama.cpp treats as end of generation even when the GGUF names no eot/eom id.
_END_OF_GENERATION_TEXTS = {
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
}  # fmt: skip

_GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_BYTE = 3, 4, 6  # tokenizer.ggml.token_type values


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (as `mx.load(path, return_metadata=True)[1]` gives it)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise MlxfamError("GGUF metadata has no tokenizer.ggml.tokens")
    types = _gguf_array(metadata, "tokenizer.ggml.token_type", [1] * len(tokens))
    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        vocabulary = _tokenizers_vocabulary(_gguf_bpe(tokens, types, metadata, pre), "GGUF")
        add_bos, default_bos, default_eos = pre in _GGUF_LLAMA3_PRES, None, None
    elif kind == "llama":
        proto = _gguf_sentencepiece_proto(tokens, types, metadata)
        vocabulary = _sentencepiece_vocabulary(_sentencepiece_processor(proto, "GGUF tokenizer.ggml.tokens"))
        add_bos, default_bos, default_eos = True, 1, 2  # llama.cpp's SentencePiece defaults
    else:
        raise MlxfamError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', 'llama')")

    bos_id = _gguf_int(metadata, "tokenizer.ggml.bos_token_id", default_bos)
    eos_id = _gguf_int(metadata, "tokenizer.ggml.eos_token_id", default_eos)
    add_bos = bool(_gguf_int(metadata, "tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(_gguf_int(metadata, "tokenizer.ggml.add_eos_token", False))
    end_ids = [_gguf_int(metadata, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    end_ids += [i for i, token in enumerate(tokens) if types[i] == _GGUF_CONTROL and token in _END_OF_GENERATION_TEXTS]
    return Tokenizer(
        vocabulary,
        bos_token_id=bos_id,
        eos_token_ids=[i for i in end_ids if i is not None],
        prefix_ids=_added_if(add_bos, bos_id, "GGUF tokenizer.ggml.add_bos_token"),
        suffix_ids=_added_if(add_eos, eos_id, "GGUF tokenizer.ggml.add_eos_token"),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _gguf_int(metadata: dict, key: str, default):
    value = metadata.get(key)
    return default if value is None else int(value.item() if hasattr(value, "item") else value)


def _gguf_array(metadata: dict, key: str, default: list) -> list:
    value = metadata.get(key)
    return default if value is None else value.tolist() if hasattr(value, "tolist") else list(value)


def _gguf_bpe(tokens: list[str], types: list[int], metadata: dict, pre: str) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` splitting text the way llama.cpp does for `pre`."""
    if pre not in _GGUF_PRE_PATTERNS:
        raise MlxfamError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported (supported: {sorted(_GGUF_PRE_PATTERNS)})")
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise MlxfamError("GGUF tokenizer.ggml.model 'gpt2' needs tokenizer.ggml.merges, which is missing")
    # "a b": llama.cpp splits at the first space after the first character.
    pairs = [(merge[: merge.index(" ", 1)], merge[merge.index(" ", 1) + 1 :]) for merge in merges]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _GGUF_LLAMA3_PRES))
    if pre in _GGUF_NFC_PRES:
        tokenizer.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in _GGUF_PRE_PATTERNS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp matches these in text before pre-tokenizing (control ones only when parsing specials).
    controls = [token for token, kind in zip(tokens, types) if kind == _GGUF_CONTROL]
    user_defined = [token for token, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in controls])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
    return tokenizer


def _gguf_sentencepiece_proto(tokens: list[str], types: list[int], metadata: dict) -> bytes:
    """A serialized SentencePiece ModelProto (BPE) equivalent to llama.cpp's SPM tokenizer for this vocabulary.

    GGUF token types use SentencePiece's numbering (1 normal ... 6 byte); 0 (undefined) counts as normal.
    Llama's normalizer is the identity: only spaces become "▁", plus the dummy prefix.
    """
    scores = _gguf_array(metadata, "tokenizer.ggml.scores", [0.0] * len(tokens))
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, token.encode()) + _pb_float(2, score) + _pb_int(3, kind or 1))
        for token, score, kind in zip(tokens, scores, types)
    )
    byte_fallback = _GGUF_BYTE in types
    trainer = _pb_int(3, 2) + _pb_int(4, len(tokens)) + _pb_int(35, byte_fallback)  # model_type BPE
    normalizer = (
        _pb_bytes(1, b"identity")
        + _pb_int(3, bool(_gguf_int(metadata, "tokenizer.ggml.add_space_prefix", True)))
        + _pb_int(4, bool(_gguf_int(metadata, "tokenizer.ggml.remove_extra_whitespaces", False)))
        + _pb_int(5, True)  # escape_whitespaces
    )
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_int(field_number: int, value: int) -> bytes:
    return _pb_varint(field_number << 3) + _pb_varint(int(value))


def _pb_float(field_number: int, value: float) -> bytes:
    return _pb_varint(field_number << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field_number: int, data: bytes) -> bytes:
    return _pb_varint(field_number << 3 | 2) + _pb_varint(len(data)) + data
