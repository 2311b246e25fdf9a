"""SentencePiece `tokenizer.model` vocabularies."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from ..errors import MlxfamError
from .core import Tokenizer, Vocabulary

# transformers' class that reads a bare tokenizer.model, as written to tokenizer_config.json.
_SENTENCEPIECE_TOKENIZER_CLASS = "LlamaTokenizer"


def sentencepiece_processor(model_proto: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
        raise MlxfamError(f"{source}: not a valid SentencePiece model ({e})") from None


def sentencepiece_vocabulary(processor: sentencepiece.SentencePieceProcessor) -> Vocabulary:
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
    return Vocabulary(
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
    """tokenizer.model, as HF repositories of SentencePiece models ship it; BOS/EOS go in as config flags."""
    prefix, suffix = owner._prefix_ids, owner._suffix_ids
    if prefix not in ([], [owner.bos_token_id]) or suffix not in ([], [owner.eos_token_id]):
        raise MlxfamError(f"a SentencePiece tokenizer adding {prefix} / {suffix} around texts cannot be saved")
    (directory / "tokenizer.model").write_bytes(processor.serialized_model_proto())
    # legacy: each text segment between special tokens gets its own dummy prefix, as encode does here.
    flags = {"add_bos_token": bool(prefix), "add_eos_token": bool(suffix), "legacy": True}
    return {"tokenizer_class": _SENTENCEPIECE_TOKENIZER_CLASS, **flags}
