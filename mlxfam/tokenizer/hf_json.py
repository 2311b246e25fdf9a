"""Hugging Face `tokenizer.json` vocabularies, run by the `tokenizers` library (also the engine of GGUF byte-level
BPE vocabularies)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tokenizers
from tokenizers import processors

from ..errors import MlxfamError
from .core import BYTE_CHARS, FileDefaults, Tokenizer, Vocabulary

_CHAR_BYTES = {char: byte for byte, char in enumerate(BYTE_CHARS)}


def tokenizers_vocabulary(tokenizer: tokenizers.Tokenizer, source: str) -> Vocabulary:
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
    return Vocabulary(
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


def read_tokenizer_json(file: Path) -> tuple[Vocabulary, FileDefaults]:
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # `tokenizers` raises bare Exceptions
        raise MlxfamError(f"{file}: not a tokenizer.json the tokenizers library can read ({e})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    prefix, suffix = _post_processor_ids(tokenizer)
    return tokenizers_vocabulary(tokenizer, str(file)), FileDefaults(prefix_ids=prefix, suffix_ids=suffix)
