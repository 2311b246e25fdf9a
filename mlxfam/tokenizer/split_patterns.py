"""The pre-tokenizer regexes byte-level BPE vocabularies split text with before merging (their tokenizer code's
`pat_str`/`PAT_STR`, and llama.cpp's `tokenizer.ggml.pre` types, which name the vocabularies using them)."""

# Contractions, letter runs with one optional leading non-letter, single digits, punctuation runs, newlines.
SINGLE_DIGIT_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# As SINGLE_DIGIT_SPLIT, but digits go in runs of up to three.
DIGIT_TRIPLE_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The first byte-level BPE's split (GPT-2's encoder.py), as llama.cpp writes it: each run keeps one leading space.
SPACE_PREFIX_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
