"""Text <-> token ids behind one interface (`Tokenizer`), from a Hugging Face `tokenizer.json`, a SentencePiece
`tokenizer.model`, a tiktoken BPE file or a GGUF vocabulary. No Python file from a model repository is run: a
family whose repository tokenizes in Python restates that code in its family module (mlxfam/models/).

Modules: `core` (Tokenizer, Vocabulary, the streaming detokenizer), `hf_json`, `spm_vocab`, `tiktoken_vocab` and
`gguf_vocab` (one per kind of vocabulary file), `split_patterns` (pre-tokenizer regexes), `directory`
(`load_tokenizer` for a model directory).
"""

from .core import StreamingDetokenizer, Tokenizer
from .directory import load_tokenizer
from .gguf_vocab import tokenizer_from_gguf

__all__ = ["StreamingDetokenizer", "Tokenizer", "load_tokenizer", "tokenizer_from_gguf"]
