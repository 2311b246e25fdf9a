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
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .chat_formats import CHAT_FORMATS, ChatFormat
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
        vocabulary: _Vocabulary,
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
        save=lambda directory, owner: _save_tokenizer_json(tokenizer, directory, owner),
    )


def _save_tokenizer_json(tokenizer: tokenizers.Tokenizer, directory: Path, owner: Tokenizer) -> dict:
    """tokenizer.json with a post-processor adding exactly the ids `owner.encode` adds (tokenizer_config.json's
    add_bos_token may have changed them from the file's own)."""
    saved = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    prefix, suffix = owner._prefix_ids, owner._suffix_ids
    added = [saved.id_to_token(i) for i in prefix + suffix]
    saved.post_processor = processors.TemplateProcessing(
        single=[*added[: len(prefix)], "$A", *added[len(prefix) :]],
        special_tokens=sorted(set(zip(added, prefix + suffix))),
    )
    saved.save(str(directory / "tokenizer.json"))
    # The generic class runs tokenizer.json as written; a model-specific one (which transformers would
    # pick from config.json's model_type) may rebuild the post-processor.
    return {"tokenizer_class": "PreTrainedTokenizerFast"}


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
        save=lambda directory, owner: _save_sentencepiece(processor, directory, owner),
    )


def _save_sentencepiece(processor: sentencepiece.SentencePieceProcessor, directory: Path, owner: Tokenizer) -> dict:
    """tokenizer.model, as the Llama 2 generation of HF repos ships it; BOS/EOS go in as config flags."""
    prefix, suffix = owner._prefix_ids, owner._suffix_ids
    if prefix not in ([], [owner.bos_token_id]) or suffix not in ([], [owner.eos_token_id]):
        raise MlxfamError(f"a SentencePiece tokenizer adding {prefix} / {suffix} around texts cannot be saved")
    (directory / "tokenizer.model").write_bytes(processor.serialized_model_proto())
    # legacy: each text segment between special tokens gets its own dummy prefix, as encode does here.
    flags = {"add_bos_token": bool(prefix), "add_eos_token": bool(suffix), "legacy": True}
    return {"tokenizer_class": "LlamaTokenizer", **flags}


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
    chat_format: ChatFormat | None = None  # the family's built-in chat prompt, where its repository has one


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no tokenizer files."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file)
    model_config = _read_json(path / "config.json")
    family = _tokenizer_family(path, config, model_config)
    read = _read_chatglm(path, config, model_config) if family == "chatglm" else _read_vocabulary_files(path, config)
    if read is None:
        return None
    vocabulary, defaults = read
    if family not in (None, "chatglm"):
        chat_format, stop_ids = _family_chat(family, vocabulary, path)
        defaults.chat_format, defaults.stop_ids = chat_format, defaults.stop_ids + stop_ids

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
        *_id_list(model_config.get("eos_token_id"), path / "config.json"),
    ]
    template, chat_format = _chat_template(path, config), defaults.chat_format
    if template is not None and chat_format is not None and not chat_format.uses_template:
        chat_format = None  # the repository's jinja template is its chat prompt
    return Tokenizer(
        vocabulary,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        prefix_ids=prefix,
        suffix_ids=suffix,
        chat_template=template,
        chat_format=chat_format,
    )


def _read_vocabulary_files(path: Path, config: dict) -> tuple[_Vocabulary, _FileDefaults] | None:
    """The vocabulary of tokenizer.json, else tokenizer.model or a *.tiktoken file; None without any."""
    model_files = [path / "tokenizer.model", *sorted(path.glob("*.tiktoken"))]
    if (path / "tokenizer.json").is_file():
        return _read_tokenizer_json(path / "tokenizer.json")
    if any(f.is_file() for f in model_files):
        vocabulary, defaults = _read_bpe_model(next(f for f in model_files if f.is_file()))
        return _with_added_tokens(vocabulary, _added_tokens(config, path / "tokenizer_config.json")), defaults
    if (path / "merges.txt").is_file():
        raise MlxfamError(f"{path}: vocab.json/merges.txt without a tokenizer.json is not supported")
    return None


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


# --- tokenizers shipped as Python code in model repositories -----------------------------------------------
# Re-implemented from the original tokenization_*.py files and chat code, which are never imported or run: the
# vocabulary file each tokenizer class reads, the special tokens it puts around a text, and the chat format and
# stop tokens of the family's chat().

# tokenizer_class -> family. YiTokenizer is LlamaTokenizer under another name: the generic reading is exact.
_REMOTE_TOKENIZER_CLASSES = {
    "QWenTokenizer": "qwen",
    "ChatGLMTokenizer": "chatglm",
    "BaichuanTokenizer": "baichuan",
    "BaiChuanTokenizer": "baichuan",  # Baichuan-7B
    "InternLMTokenizer": "internlm",  # also InternLM2's first releases (config.json model_type internlm2)
    "InternLM2Tokenizer": "internlm2",
    "InternLM2TokenizerFast": "internlm2",
    "YiTokenizer": None,
}
_FAMILY_MODEL_TYPES = {"qwen", "chatglm", "baichuan", "internlm", "internlm2", "minicpm"}
_FAMILY_VOCABULARY_FILES = {"qwen.tiktoken": "qwen", "ice_text.model": "chatglm"}


def _tokenizer_family(path: Path, config: dict, model_config: dict) -> str | None:
    """The family whose tokenizer rules apply: named by the tokenizer class, else by config.json's model_type,
    else by the vocabulary file's name. A tokenizer class shipped as code that is not implemented here is refused
    (a class named besides the shipped one is a transformers class, which transformers itself would use)."""
    remote_class, remote_source = _remote_tokenizer_class(path, config, model_config)
    named = [
        (config.get("tokenizer_class"), path / "tokenizer_config.json"),
        (model_config.get("tokenizer_class"), path / "config.json"),
    ]
    tokenizer_class, source = next(((name, file) for name, file in named if name), (remote_class, remote_source))
    model_type = model_config.get("model_type")
    if tokenizer_class in _REMOTE_TOKENIZER_CLASSES:
        family = _REMOTE_TOKENIZER_CLASSES[tokenizer_class]
        return "internlm2" if family == "internlm" and model_type == "internlm2" else family
    if tokenizer_class is not None and tokenizer_class == remote_class:
        implemented = ", ".join(_REMOTE_TOKENIZER_CLASSES)
        raise MlxfamError(
            f"{source}: tokenizer class {tokenizer_class!r} is Python code in the model repository, which mlxfam "
            f"never runs, and mlxfam has no implementation of it (implemented: {implemented})"
        )
    if model_type in _FAMILY_MODEL_TYPES:
        return model_type
    return next((family for name, family in _FAMILY_VOCABULARY_FILES.items() if (path / name).is_file()), None)


def _remote_tokenizer_class(path: Path, config: dict, model_config: dict) -> tuple[str | None, Path | None]:
    """The tokenizer class a repository ships as code (auto_map's AutoTokenizer: "module.Class" or a
    [slow, fast] pair of them), and the file naming it."""
    for source, settings in ((path / "tokenizer_config.json", config), (path / "config.json", model_config)):
        auto_map = settings.get("auto_map")
        entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        references = [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else []
        reference = next((r for r in references if isinstance(r, str)), None)
        if reference is not None:
            return reference.rsplit(".", 1)[-1], source
    return None, None


def _family_chat(family: str, vocabulary: _Vocabulary, path: Path) -> tuple[ChatFormat | None, list[int]]:
    """The chat format and the further stop ids of a family's chat() (ChatGLM's come with its vocabulary)."""
    chat_format, stop_ids = CHAT_FORMATS[family], []
    generation_file = path / "generation_config.json"
    generation = _read_json(generation_file)
    if family == "qwen":
        mode = generation.get("chat_format", "chatml")
        if mode not in ("chatml", "raw"):
            raise MlxfamError(f"{generation_file}: chat_format {mode!r} is not supported ('chatml' or 'raw')")
        # A "raw" (base) model has no chat prompt; the ChatML stop tokens come with qwen.tiktoken either way.
        chat_format = chat_format if mode == "chatml" else None
    elif family == "baichuan":
        role_ids = {
            key: _vocabulary_id(vocabulary, generation.get(key, default), f"{generation_file}: {key}")
            for key, default in chat_format.options.items()
        }
        chat_format = chat_format.with_options(**role_ids)
    elif family == "internlm":
        stop_ids = [_required_token(vocabulary, token, path, "InternLM") for token in ("<eoa>", "<eoh>")]
    elif family == "internlm2":
        # <|im_start|> 92543 and <|im_end|> 92542, spelled [UNUSED_TOKEN_146] / [UNUSED_TOKEN_145] in the first files.
        im_start, im_end = (_token_text(vocabulary, i, path, "InternLM2") for i in (92543, 92542))
        chat_format, stop_ids = chat_format.with_options(im_start=im_start, im_end=im_end), [92542]
    else:  # minicpm: its chat() cuts the reply at the next <用户> or <AI>
        stop_ids = [vocabulary.vocab[token] for token in ("<用户>", "<AI>") if token in vocabulary.vocab]
    return chat_format, stop_ids


def _vocabulary_id(vocabulary: _Vocabulary, value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(vocabulary.pieces):
        raise MlxfamError(f"{where} = {value!r} is not a token id of the vocabulary ({len(vocabulary.pieces)} ids)")
    return value


def _required_token(vocabulary: _Vocabulary, token: str, path: Path, family: str) -> int:
    if token not in vocabulary.vocab:
        raise MlxfamError(f"{path}: {family}'s chat needs the token {token!r}, which the vocabulary lacks")
    return vocabulary.vocab[token]


def _token_text(vocabulary: _Vocabulary, token_id: int, path: Path, family: str) -> str:
    # The last name wins: tokenizer_config.json's added tokens rename pieces of the vocabulary file.
    text = next((token for token, i in reversed(vocabulary.vocab.items()) if i == token_id), None)
    if text is None:
        raise MlxfamError(f"{path}: {family}'s chat needs token id {token_id}, which the vocabulary lacks")
    return text


# ChatGLM2/3's SPTokenizer appends these after the SentencePiece pieces; its tokenizer never finds them in text.
_CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _read_chatglm(path: Path, config: dict, model_config: dict) -> tuple[_Vocabulary, _FileDefaults] | None:
    """ChatGLM-6B's ice_text.model, or ChatGLM2/3's tokenizer.model plus the specials their code appends;
    None without either file."""
    if (path / "ice_text.model").is_file():
        return _read_chatglm1(path / "ice_text.model", config)
    file = path / "tokenizer.model"
    if not file.is_file():
        return None
    version = _chatglm2_or_3(path, config, model_config)
    processor = _sentencepiece_processor(file.read_bytes(), str(file))
    vocabulary = _with_appended_tokens(
        _sentencepiece_vocabulary(processor), _CHATGLM2_SPECIALS + (_CHATGLM3_ROLES if version == 3 else ())
    )
    vocabulary = _with_added_tokens(vocabulary, _added_tokens(config, path / "tokenizer_config.json"))
    ids = vocabulary.vocab
    return vocabulary, _FileDefaults(
        bos_id=None,  # the [gMASK] sop prefix takes BOS's place
        eos_id=processor.eos_id(),
        prefix_ids=[ids["[gMASK]"], ids["sop"]],
        # ChatGLM3's chat() also ends at the next user or tool turn.
        stop_ids=[ids["<|user|>"], ids["<|observation|>"]] if version == 3 else [],
        chat_format=CHAT_FORMATS[f"chatglm{version}"],
    )


def _chatglm2_or_3(path: Path, config: dict, model_config: dict) -> int:
    """ChatGLM2 and ChatGLM3 ship the same tokenizer.model (their code differs): only the repository name
    recorded in the configs tells them apart."""
    names = {
        f"{path / 'tokenizer_config.json'} name_or_path": config.get("name_or_path"),
        f"{path / 'config.json'} _name_or_path": model_config.get("_name_or_path"),
    }
    for name in map(str, names.values()):
        if "chatglm3" in name.lower():
            return 3
        if "chatglm2" in name.lower() or "codegeex2" in name.lower():
            return 2
    given = ", ".join(f"{where} = {name!r}" for where, name in names.items())
    raise MlxfamError(
        f"{path}: cannot tell ChatGLM2 from ChatGLM3 (same tokenizer.model, different chat formats): "
        f"neither {given} names chatglm2 or chatglm3"
    )


def _with_appended_tokens(vocabulary: _Vocabulary, names: tuple[str, ...]) -> _Vocabulary:
    """`names` as ids after the vocabulary's own, for decoding and lookup only (never matched in text)."""
    appended = {name: len(vocabulary.pieces) + i for i, name in enumerate(names)}
    return _Vocabulary(
        encode_ordinary=vocabulary.encode_ordinary,
        pieces=vocabulary.pieces + [name.encode() for name in names],
        vocab=vocabulary.vocab | appended,
        specials=vocabulary.specials,
        special_ids=vocabulary.special_ids | frozenset(appended.values()),
        strip_leading_space=vocabulary.strip_leading_space,
    )


# ChatGLM-6B's SPTokenizer writes these for whitespace before SentencePiece sees the text (max_blank_length 80).
_ICETK_WHITESPACE = {"<n>": "\n", "<|tab|>": "\t"} | {f"<|blank_{n}|>": " " * n for n in range(2, 81)}


def _icetk_text(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return re.sub(" {2,80}", lambda run: f"<|blank_{len(run.group())}|>", text)


def _read_chatglm1(file: Path, config: dict) -> tuple[_Vocabulary, _FileDefaults]:
    """ChatGLM-6B's tokenizer: whitespace written as <n>, <|tab|>, <|blank_n|> before SentencePiece (and back
    when decoding), ids shifted past `num_image_tokens` image tokens, [gMASK] <sop> appended to a text."""
    config_file = file.parent / "tokenizer_config.json"
    for flag in ("remove_space", "do_lower_case"):
        if config.get(flag):
            raise MlxfamError(f"{config_file}: {flag} true is not supported (ChatGLM-6B ships false)")
    offset = config.get("num_image_tokens", 20000)  # the tokenizer's default; the final release sets 0
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise MlxfamError(f"{config_file}: num_image_tokens must be a non-negative int, got {offset!r}")
    processor = _sentencepiece_processor(file.read_bytes(), str(file))
    text = _sentencepiece_vocabulary(processor)
    pieces = list(text.pieces)
    for token, replacement in _ICETK_WHITESPACE.items():
        if token in text.vocab:
            pieces[text.vocab[token]] = replacement.encode()
    vocabulary = _Vocabulary(
        encode_ordinary=lambda s: [offset + i for i in processor.encode(_icetk_text(s))],
        pieces=[b""] * offset + pieces,  # image tokens decode to nothing
        vocab={token: offset + i for token, i in text.vocab.items()},
        specials={token: offset + i for token, i in text.specials.items()},
        special_ids=frozenset(offset + i for i in text.special_ids),
        strip_leading_space=text.strip_leading_space,
    )
    gmask = _token_id(vocabulary, config.get("gmask_token", "[gMASK]"), f"{config_file}: gmask_token")
    sop = _token_id(vocabulary, config.get("bos_token", "<sop>"), f"{config_file}: bos_token")
    return vocabulary, _FileDefaults(
        bos_id=sop,
        eos_id=_token_id(vocabulary, config.get("eos_token", "<eop>"), f"{config_file}: eos_token"),
        suffix_ids=[gmask, sop],
        chat_format=CHAT_FORMATS["chatglm1"],
    )


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
