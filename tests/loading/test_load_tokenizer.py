"""`mlxfam.load_tokenizer(ref)`: the tokenizer of any reference without building the model, against llama.cpp's
own ids for its vocabulary-only GGUF files (tests/data/tokenizers/llama.cpp-vocab)."""

import lzma
from pathlib import Path

import gguf_writer as gw
import pytest
from llama_cpp_vocab import VOCABS, llama_cpp_cases

import mlxfam
from mlxfam import gguf
from mlxfam.errors import MlxfamError


def vocab_gguf(directory: Path, name: str) -> Path:
    path = directory / f"ggml-vocab-{name}.gguf"
    path.write_bytes(lzma.decompress((VOCABS / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    return path


@pytest.fixture
def no_model_building(monkeypatch):
    monkeypatch.setattr(gguf, "read", lambda path: pytest.fail("read the model's tensors"))


@pytest.mark.parametrize("name", ["llama-spm", "qwen2", "gpt-2"])
def test_vocabulary_only_gguf_tokenizes_as_llama_cpp(tmp_path, no_model_building, name):
    tokenizer = mlxfam.load_tokenizer(vocab_gguf(tmp_path, name))
    for text, ids in llama_cpp_cases(name)[:8]:
        assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_directory_holding_a_vocabulary_gguf(tmp_path, no_model_building):
    vocab_gguf(tmp_path, "llama-bpe")
    tokenizer = mlxfam.load_tokenizer(str(tmp_path))
    text, ids = llama_cpp_cases("llama-bpe")[3]
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_later_part_of_a_split_gguf_is_refused(tmp_path):
    for number in (0, 1):
        tensors = {f"t{number}": (bytes(128), (1, 32), gw.F32)}
        metadata = {"split.no": number, "split.count": 2, "split.tensors.count": 2}
        gw.write(tmp_path / f"m-{number + 1:05d}-of-00002.gguf", metadata, tensors)
    with pytest.raises(MlxfamError, match=r"is part 2 of a split GGUF: load its first part"):
        mlxfam.load_tokenizer(tmp_path / "m-00002-of-00002.gguf")


def test_gguf_without_vocabulary_has_no_tokenizer(tmp_path, no_model_building):
    gw.write_yi_gguf(tmp_path / "yi.gguf", gw.F32)
    assert mlxfam.load_tokenizer(tmp_path / "yi.gguf") is None
