"""tiktoken BPE files (lines "<base64 token> <rank>"). The file carries only the ranks: the split pattern and the
special tokens come from the family's own tokenizer code (never run here), which its family module states as a
`TiktokenDefinition`."""

from __future__ import annotations

import base64
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from ..errors import MlxfamError
from .core import BYTE_CHARS, FileDefaults, Vocabulary


@dataclass(frozen=True)
class TiktokenDefinition:
    """What a family's own tokenizer code builds around the tiktoken ranks in its file `file_name`."""

    name: str
    file_name: str  # the vocabulary file this definition reads (in a model directory)
    n_ranks: int
    pattern: str
    specials: tuple[str, ...]  # ids n_ranks, n_ranks + 1, ...
    bos: str | None
    eos: str
    stops: tuple[str, ...]  # further tokens generation ends on
    nfc: bool  # the text is NFC-normalised before encoding


def tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """The ranks of a tiktoken BPE file, or None when `data` is not one."""
    try:
        return {
            base64.b64decode(token, validate=True): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
    except ValueError:  # also binascii.Error, and a SentencePiece protobuf's first "line"
        return None


def read_tiktoken(
    ranks: dict[bytes, int], definition: TiktokenDefinition, source: Path
) -> tuple[Vocabulary, FileDefaults]:
    """The vocabulary of `definition` over the `ranks` read from `source`, with its BOS, EOS and stop tokens."""
    if len(ranks) != definition.n_ranks:
        raise MlxfamError(
            f"{source}: {len(ranks)} BPE ranks, but {definition.name}'s tokenizer has {definition.n_ranks}"
        )
    specials = {token: definition.n_ranks + i for i, token in enumerate(definition.specials)}
    encoding = tiktoken.Encoding(
        definition.name, pat_str=definition.pattern, mergeable_ranks=ranks, special_tokens=specials
    )
    pieces = [b""] * (definition.n_ranks + len(specials))
    for token, rank in ranks.items():
        pieces[rank] = token
    for token, i in specials.items():
        pieces[i] = token.encode()
    # Vocabulary strings in the byte alphabet, as in the tokenizer.json HF derives from these files.
    vocab = {"".join(BYTE_CHARS[b] for b in token): rank for token, rank in ranks.items()} | specials
    if definition.nfc:
        encode_ordinary = lambda text: encoding.encode_ordinary(unicodedata.normalize("NFC", text))  # noqa: E731
    else:
        encode_ordinary = encoding.encode_ordinary
    vocabulary = Vocabulary(encode_ordinary, pieces, vocab, specials=specials, special_ids=frozenset(specials.values()))
    bos_id = specials.get(definition.bos)
    defaults = FileDefaults(
        bos_id,
        specials[definition.eos],
        stop_ids=[specials[token] for token in definition.stops],
        prefix_ids=[bos_id] if bos_id is not None else [],
    )
    return vocabulary, defaults
