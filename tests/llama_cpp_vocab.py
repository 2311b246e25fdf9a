"""llama.cpp's vocabulary test files (tests/data/tokenizers/llama.cpp-vocab): texts and the ids llama.cpp gives them."""

from pathlib import Path

VOCABS = Path(__file__).parent / "data" / "tokenizers" / "llama.cpp-vocab"


def llama_cpp_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs as llama.cpp's test-tokenizer-0 reads them: texts separated by
    "\\n__ggml_vocab_test__\\n" (so each keeps no trailing newline of its own), one line of ids per text."""
    raw = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    assert texts.pop() == ""  # the file ends with a separator
    lines = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def llama_cpp_ids(name: str, text: str) -> list[int]:
    return dict(llama_cpp_cases(name))[text]
