"""GGUF vocabularies (llama.cpp's `tokenizer.ggml.*` metadata), rebuilt as `tokenizers` byte-level BPE or
SentencePiece models that split and merge text the way llama.cpp does."""

from __future__ import annotations

import struct

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import MlxfamError
from .core import Tokenizer, Vocabulary, added_if
from .hf_json import tokenizers_vocabulary
from .split_patterns import DIGIT_TRIPLE_SPLIT, SINGLE_DIGIT_SPLIT, SPACE_PREFIX_SPLIT
from .spm_vocab import sentencepiece_processor, sentencepiece_vocabulary

# llama.cpp's pre-tokenizer regexes per `tokenizer.ggml.pre` (src/llama-vocab.cpp), applied one after another;
# where llama.cpp rewrote a tokenizer.json regex for its own engine, the original is used (onig runs it).
_GGUF_PRE_PATTERNS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", SPACE_PREFIX_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [DIGIT_TRIPLE_SPLIT],
    "llama-v3": [DIGIT_TRIPLE_SPLIT],
    "llama-bpe": [DIGIT_TRIPLE_SPLIT],
    "falcon3": [DIGIT_TRIPLE_SPLIT],
    "dbrx": [DIGIT_TRIPLE_SPLIT],
    "smaug-bpe": [DIGIT_TRIPLE_SPLIT],
    "gpt-2": [SPACE_PREFIX_SPLIT],
    "phi-2": [SPACE_PREFIX_SPLIT],
    "mpt": [SPACE_PREFIX_SPLIT],
    "olmo": [SPACE_PREFIX_SPLIT],
    "starcoder": [r"\p{N}", SPACE_PREFIX_SPLIT],
    "refact": [r"\p{N}", SPACE_PREFIX_SPLIT],
    "smollm": [r"\p{N}", SPACE_PREFIX_SPLIT],
    "codeshell": [r"\p{N}", SPACE_PREFIX_SPLIT],
    "command-r": [r"\p{N}", SPACE_PREFIX_SPLIT],
    "qwen2": [SINGLE_DIGIT_SPLIT],
    "deepseek-r1-qwen": [SINGLE_DIGIT_SPLIT],
    "megrez": [SINGLE_DIGIT_SPLIT],
    "stablelm2": [SINGLE_DIGIT_SPLIT],
}
# llama.cpp sets ignore_merges (a whole pre-token found in the vocabulary is one token) and add_bos for these.
_IGNORE_MERGES_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}
# The tokenizers these pre types stand for NFC-normalise their input (llama.cpp does not).
_NFC_PRES = {"qwen2", "deepseek-r1-qwen", "megrez"}
# Token texts llama.cpp treats as end of generation even when the GGUF names no eot/eom id.
_END_OF_GENERATION_TEXTS = {
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
}  # fmt: skip

_GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_BYTE = 3, 4, 6  # tokenizer.ggml.token_type values


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (as `mlxfam.gguf_reader.read_gguf(path).metadata` gives it)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise MlxfamError("GGUF metadata has no tokenizer.ggml.tokens")
    if kind not in _GGUF_TOKENIZER_MODELS:
        supported = ", ".join(map(repr, _GGUF_TOKENIZER_MODELS))
        raise MlxfamError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: {supported})")
    types = _gguf_array(metadata, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocabulary, add_bos, default_bos, default_eos = _GGUF_TOKENIZER_MODELS[kind](tokens, types, metadata)

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
        prefix_ids=added_if(add_bos, bos_id, "GGUF tokenizer.ggml.add_bos_token"),
        suffix_ids=added_if(add_eos, eos_id, "GGUF tokenizer.ggml.add_eos_token"),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _gguf_bpe_vocabulary(tokens: list[str], types: list[int], metadata: dict) -> tuple[Vocabulary, bool, None, None]:
    """Byte-level BPE; whether llama.cpp adds BOS depends on the pre-tokenizer type."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    return (
        tokenizers_vocabulary(_gguf_bpe(tokens, types, metadata, pre), "GGUF"),
        pre in _IGNORE_MERGES_PRES,
        None,
        None,
    )


def _gguf_sentencepiece_vocabulary(
    tokens: list[str], types: list[int], metadata: dict
) -> tuple[Vocabulary, bool, int, int]:
    """SentencePiece, with llama.cpp's defaults: BOS added, BOS 1, EOS 2."""
    proto = _gguf_sentencepiece_proto(tokens, types, metadata)
    return sentencepiece_vocabulary(sentencepiece_processor(proto, "GGUF tokenizer.ggml.tokens")), True, 1, 2


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
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES_PRES))
    if pre in _NFC_PRES:
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
    llama.cpp's SPM normalizer is the identity: only spaces become "▁", plus the dummy prefix.
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


# tokenizer.ggml.model values (llama.cpp's names for the two vocabulary kinds) -> (vocabulary, add BOS, BOS, EOS).
_GGUF_TOKENIZER_MODELS = {"gpt2": _gguf_bpe_vocabulary, "llama": _gguf_sentencepiece_vocabulary}
