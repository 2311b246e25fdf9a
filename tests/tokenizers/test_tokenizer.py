"""Tokenizers checked against independent references: llama.cpp's token ids for its vocabulary test files,
SentencePiece itself, the `tokenizers` library's own decoder, and strings checkable by hand."""

import base64
import json
import lzma
import shutil
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import pytest
import sentencepiece
import tokenizers
from llama_cpp_vocab import VOCABS, llama_cpp_cases, llama_cpp_ids
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from mlxfam.errors import MlxfamError
from mlxfam.tokenizer import load_tokenizer, tokenizer_from_gguf

DATA = Path(__file__).parents[1] / "data" / "tokenizers"
VOCAB_NAMES = ["llama-spm", "llama-bpe", "qwen2", "gpt-2"]

# Texts whose tokens split multi-byte characters (byte fallback, byte-level BPE) and need the SPM space rules.
STREAMING_TEXTS = [
    "Hello world",
    " leading space, then\nnew lines\n\n",
    "Grüße aus Köln: naïve café, São Paulo, Ελληνικά",
    "我想在apple工作，天气很好。日本語のテキスト",
    "🦙🚀 😶‍🌫️ emoji ✅ and 👩🏽‍💻 zwj sequences",
    "def f(x):\n\treturn {'a': [1, 2]}  # ½ → ∞",
]


@pytest.fixture(scope="module")
def gguf_metadata(tmp_path_factory):
    """name -> the GGUF metadata of a decompressed llama.cpp vocabulary file (each read once per module)."""
    cache = {}

    def read(name: str) -> dict:
        if name not in cache:
            path = tmp_path_factory.mktemp("vocab") / f"ggml-vocab-{name}.gguf"
            path.write_bytes(lzma.decompress((VOCABS / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
            cache[name] = mx.load(str(path), return_metadata=True)[1]
        return cache[name]

    return read


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_metadata):
    cache = {}

    def build(name: str):
        if name not in cache:
            cache[name] = tokenizer_from_gguf(gguf_metadata(name))
        return cache[name]

    return build


# --- GGUF vocabularies against llama.cpp --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, expected",
    [(name, text, ids) for name in VOCAB_NAMES for text, ids in llama_cpp_cases(name)],
    ids=[f"{name}-{i:02d}" for name in VOCAB_NAMES for i in range(len(llama_cpp_cases(name)))],
)
def test_gguf_matches_llama_cpp(gguf_tokenizer, name, text, expected):
    tokenizer = gguf_tokenizer(name)
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    assert tokenizer.decode(expected) == text


def test_llama_cpp_cases_are_read_like_test_tokenizer_0():
    cases = llama_cpp_cases("gpt-2")
    assert len(cases) == 46
    assert cases[0][0] == "ied 4 ½ months"
    assert [text for text, _ in cases[2:7]] == ["", " ", "  ", "   ", "\t"]
    assert cases[7] == ("\n", [198])
    assert cases[2][1] == []


@pytest.mark.parametrize(
    "name, bos",
    [("llama-spm", [1]), ("llama-bpe", [128000]), ("qwen2", []), ("gpt-2", [])],
)
def test_gguf_adds_bos_as_llama_cpp_does(gguf_tokenizer, name, bos):
    # llama.cpp adds BOS for SentencePiece and Llama 3 vocabularies unless the file says otherwise.
    assert gguf_tokenizer(name).encode(" Hello World!") == bos + llama_cpp_ids(name, " Hello World!")


def test_gguf_special_tokens_and_stop_ids(gguf_tokenizer):
    llama3 = gguf_tokenizer("llama-bpe")
    # docs/families.md#llama-3: <|start_header_id|> 128006, <|end_header_id|> 128007, <|eot_id|> 128009.
    hello = llama_cpp_ids("llama-bpe", "Hello")
    assert llama3.encode("<|start_header_id|>Hello<|end_header_id|><|eot_id|>", add_special_tokens=False) == [
        128006,
        *hello,
        128007,
        128009,
    ]
    assert (llama3.bos_token, llama3.bos_token_id, llama3.eos_token_id) == ("<|begin_of_text|>", 128000, 128001)
    assert set(llama3.eos_token_ids) == {128001, 128009}
    assert llama3.decode([128000, *hello], skip_special_tokens=True) == "Hello"
    assert llama3.decode([128000, *hello]) == "<|begin_of_text|>Hello"

    qwen2 = gguf_tokenizer("qwen2")
    assert qwen2.encode("<|im_start|>", add_special_tokens=False) == [151644]
    assert set(qwen2.eos_token_ids) == {151643, 151645}  # <|endoftext|> and <|im_end|>

    spm = gguf_tokenizer("llama-spm")
    assert (spm.bos_token, spm.eos_token, spm.vocab_size) == ("<s>", "</s>", 32000)
    # After a special token the text gets its own dummy prefix, as in llama.cpp.
    assert spm.encode("<s>Hello", add_special_tokens=False) == [1, *llama_cpp_ids("llama-spm", "Hello")]


def test_gguf_qwen2_chat_template(gguf_tokenizer):
    qwen2 = gguf_tokenizer("qwen2")
    messages = [{"role": "user", "content": "Hi"}]
    text = qwen2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Qwen 1.5's ChatML with its default system prompt (docs/families.md#qwen2: no final period).
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = qwen2.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == 151644 and ids.count(151645) == 2
    assert qwen2.decode(ids) == text


def test_gguf_rejects_unknown_pre_tokenizer_and_model(gguf_metadata):
    metadata = dict(gguf_metadata("gpt-2"))
    with pytest.raises(MlxfamError, match="tokenizer.ggml.pre 'mystery-bpe'"):
        tokenizer_from_gguf(metadata | {"tokenizer.ggml.pre": "mystery-bpe"})
    with pytest.raises(MlxfamError, match="tokenizer.ggml.model 'bert'"):
        tokenizer_from_gguf(metadata | {"tokenizer.ggml.model": "bert"})


# --- tiktoken files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen1")
    (directory / "qwen.tiktoken").write_bytes(lzma.decompress((DATA / "qwen1" / "qwen.tiktoken.xz").read_bytes()))
    shutil.copy(DATA / "qwen1" / "tokenizer_config.json", directory)
    return load_tokenizer(directory)


def test_qwen1_matches_llama_cpp_qwen2_ids(qwen1):
    # Qwen 1.5/2 kept Qwen 1's BPE ranks and split pattern, so llama.cpp's Qwen 2 ids apply to qwen.tiktoken.
    mismatches = [(text, ids) for text, ids in llama_cpp_cases("qwen2") if qwen1.encode(text) != ids]
    assert mismatches == []


def test_qwen1_pattern_and_specials(qwen1):
    def pieces(text):
        return [qwen1.decode([i]) for i in qwen1.encode(text)]

    assert pieces("Hello world") == ["Hello", " world"]
    assert pieces("I'm 2024") == ["I", "'m", " ", "2", "0", "2", "4"]  # \p{N}: one digit per token
    assert pieces("x\n\n  y") == ["x", "\n\n", " ", " y"]
    # docs/families.md#qwen-1: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <|extra_0|> 151646.
    assert qwen1.encode("<|im_start|>user<|im_end|><|endoftext|>") == [151644, *qwen1.encode("user"), 151645, 151643]
    assert qwen1.encode("<|extra_0|><|extra_204|>") == [151646, 151850]
    assert qwen1.bos_token_id is None and qwen1.encode("Hi") == qwen1.encode("Hi", add_special_tokens=False)
    assert qwen1.eos_token_ids == [151643, 151645, 151644]
    assert qwen1.encode("Cafe\u0301") == qwen1.encode("Caf\u00e9")  # tokenization_qwen.py normalises to NFC


@pytest.mark.parametrize("text", [*STREAMING_TEXTS, "<|im_start|>system\n你好<|im_end|>"])
def test_qwen1_round_trips(qwen1, text):
    assert qwen1.decode(qwen1.encode(text)) == text


def test_llama3_original_tiktoken_file(gguf_metadata, tmp_path):
    # Meta's original/tokenizer.model: base64 token + rank lines. Rebuilt here from the llama.cpp Llama 3 vocabulary
    # (the same tokens in rank order, written in the byte-level alphabet), then checked against llama.cpp's ids.
    alphabet = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in alphabet]
    char_to_byte = {chr(b): b for b in alphabet} | {chr(256 + n): b for n, b in enumerate(extra)}
    tokens = gguf_metadata("llama-bpe")["tokenizer.ggml.tokens"][:128000]
    lines = (
        base64.b64encode(bytes(char_to_byte[c] for c in token)) + b" %d" % rank for rank, token in enumerate(tokens)
    )
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")

    tokenizer = load_tokenizer(tmp_path)
    mismatches = [
        (t, ids) for t, ids in llama_cpp_cases("llama-bpe") if tokenizer.encode(t, add_special_tokens=False) != ids
    ]
    assert mismatches == []
    assert tokenizer.encode("Hi<|eot_id|>") == [128000, *tokenizer.encode("Hi", add_special_tokens=False), 128009]
    assert tokenizer.eos_token_ids == [128001, 128008, 128009]  # docs/families.md#llama-3
    assert tokenizer.get_vocab()["Ġworld"] == llama_cpp_ids("llama-bpe", "Hello world")[1]


# --- SentencePiece tokenizer.model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def internlm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("internlm")
    (directory / "tokenizer.model").write_bytes(
        lzma.decompress((DATA / "internlm" / "tokenizer.model.xz").read_bytes())
    )
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DATA / "internlm" / name, directory)
    return directory


@pytest.fixture(scope="module")
def internlm(internlm_dir):
    return load_tokenizer(internlm_dir)


@pytest.fixture(scope="module")
def sentencepiece_reference(internlm_dir):
    return sentencepiece.SentencePieceProcessor(model_file=str(internlm_dir / "tokenizer.model"))


@pytest.mark.parametrize("text", [*STREAMING_TEXTS, *(text for text, _ in llama_cpp_cases("llama-spm"))])
def test_sentencepiece_model_matches_sentencepiece(internlm, sentencepiece_reference, text):
    expected = sentencepiece_reference.encode(text)
    assert internlm.encode(text) == [1, *expected]  # tokenizer_config.json: add_bos_token true, <s> is 1
    assert internlm.encode(text, add_special_tokens=False) == expected
    assert internlm.decode([1, *expected], skip_special_tokens=True) == sentencepiece_reference.decode(expected)


def test_sentencepiece_model_specials(internlm):
    assert (internlm.bos_token_id, internlm.eos_token_id, internlm.eos_token_ids) == (1, 2, [2])
    assert internlm.vocab_size == 103168
    # docs/families.md#internlm: <eoh> 103027 and <eoa> 103028 (user-defined pieces, matched by SentencePiece itself).
    hello = internlm.encode("Hello", add_special_tokens=False)
    assert internlm.encode("<s>Hello<eoa></s>", add_special_tokens=False) == [1, *hello, 103028, 2]
    assert internlm.decode([1, *hello, 103028, 2]) == "<s>Hello<eoa></s>"


# --- tokenizer.json directories and chat templates ----------------------------------------------------

CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if tools %}
Tools: {{ tools | tojson }} / {{ tools[0] | tojson(indent=1) }}
{% endif %}
{% if date %}
Today: {{ strftime_now("%Y") }}
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def write_gpt2_tokenizer_dir(directory: Path, metadata: dict, **config) -> Path:
    """A GPT-2 tokenizer.json made the way HF's GPT-2 one is (byte-level pre-tokenizer and decoder), plus ChatML
    tokens at 50257/50258 and a post-processor that prepends <|endoftext|>; `config` goes to tokenizer_config.json."""
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = tokenizers.Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True), "<|im_start|>", "<|im_end|>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)]
    )
    directory.mkdir(exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def chat_dir(gguf_metadata, tmp_path_factory) -> Path:
    directory = write_gpt2_tokenizer_dir(
        tmp_path_factory.mktemp("chat") / "model",
        gguf_metadata("gpt-2"),
        bos_token="<|endoftext|>",
        eos_token={"content": "<|endoftext|>", "special": True},
        chat_template=CHAT_TEMPLATE,
    )
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [50258, 50256]}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 50257}))
    return directory


@pytest.fixture(scope="module")
def chat_tokenizer(chat_dir):
    return load_tokenizer(chat_dir)


def test_tokenizer_json_matches_llama_cpp(chat_tokenizer):
    for text, ids in llama_cpp_cases("gpt-2"):
        assert chat_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert chat_tokenizer.encode(text) == [50256, *ids], text  # the post-processor's BOS
    assert chat_tokenizer.encode("<|im_start|>Hi<|im_end|>", add_special_tokens=False) == [50257, 17250, 50258]


def test_tokenizer_config_add_bos_token_overrides_post_processor(gguf_metadata, tmp_path):
    directory = write_gpt2_tokenizer_dir(tmp_path, gguf_metadata("gpt-2"), add_bos_token=False)
    assert load_tokenizer(directory).encode("Hello") == [15496]


def test_eos_token_ids_merge_all_config_files(chat_tokenizer):
    assert (chat_tokenizer.eos_token, chat_tokenizer.eos_token_id) == ("<|endoftext|>", 50256)
    assert chat_tokenizer.eos_token_ids == [50256, 50258, 50257]
    assert (chat_tokenizer.bos_token, chat_tokenizer.bos_token_id) == ("<|endoftext|>", 50256)


def test_chat_template_text_and_ids(chat_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    # trim_blocks/lstrip_blocks: block tags leave neither their newline nor their indentation behind.
    assert text == "<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    prompt = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == text + "<|im_start|>assistant\n"
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == chat_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[:2] == [50256, 50257]  # the template's BOS, and no second one


def test_chat_template_globals(chat_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    tools = [{"name": "wetter", "description": "Grüße"}]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False, tools=tools, date=True)
    assert (
        'Tools: [{"name": "wetter", "description": "Grüße"}] / {\n "name": "wetter",\n "description": "Grüße"\n}\n'
        in text
    )
    assert f"Today: {datetime.now().year}\n" in text
    with pytest.raises(MlxfamError, match="Unknown role: robot"):
        chat_tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_from_jinja_file_and_missing_template(chat_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(chat_dir, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert load_tokenizer(directory).chat_template is None
    with pytest.raises(MlxfamError, match="no chat template"):
        load_tokenizer(directory).apply_chat_template([{"role": "user", "content": "Hi"}])
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert load_tokenizer(directory).chat_template == CHAT_TEMPLATE


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path) is None


def test_bad_tokenizer_config_names_file_and_value(chat_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(chat_dir, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(MlxfamError, match=r"tokenizer_config.json: eos_token = '<\|nope\|>'"):
        load_tokenizer(directory)


def test_unknown_tokenizer_files_are_rejected(tmp_path):
    (tmp_path / "other.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(MlxfamError, match="other.tiktoken: not a known tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "other.tiktoken").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(MlxfamError, match="merges.txt without a tokenizer.json"):
        load_tokenizer(tmp_path)


def test_sentencepiece_style_tokenizer_json_decodes_like_tokenizers(gguf_metadata, tmp_path):
    # Llama 2's tokenizer.json decoder: "▁" -> " ", <0xNN> byte fallback, then one leading space stripped.
    # Only decoding is exercised, so the BPE needs no merges; `tokenizers` itself is the reference.
    tokenizer = tokenizers.Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(gguf_metadata("llama-spm")["tokenizer.ggml.tokens"])}, [], byte_fallback=True
        )
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    for _, ids in llama_cpp_cases("llama-spm"):
        for skip in (False, True):
            assert ours.decode([1, *ids], skip_special_tokens=skip) == tokenizer.decode(
                [1, *ids], skip_special_tokens=skip
            )


# --- streaming detokenizer ----------------------------------------------------------------------------


def stream(tokenizer, ids) -> list[str]:
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(i) for i in ids] + [detokenizer.finalize()]
    assert detokenizer.tokens == list(ids)
    assert detokenizer.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("name", VOCAB_NAMES)
@pytest.mark.parametrize("text", STREAMING_TEXTS)
def test_streaming_detokenizer_gguf(gguf_tokenizer, name, text):
    tokenizer = gguf_tokenizer(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", STREAMING_TEXTS)
def test_streaming_detokenizer_sentencepiece_model(internlm, text):
    ids = internlm.encode(text)
    pieces = stream(internlm, ids)
    assert "".join(pieces) == internlm.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_detokenizer_spm_spaces_and_bytes(gguf_tokenizer):
    spm = gguf_tokenizer("llama-spm")
    # The dummy-prefix space of the first piece ("▁" here) is dropped; later ones are real spaces.
    assert stream(spm, spm.encode(" Hello world", add_special_tokens=False)) == ["", " Hello", " world", ""]
    assert stream(spm, spm.encode("Hello world", add_special_tokens=False)) == ["Hello", " world", ""]
    # 🦙 has no piece: after the dummy-prefix "▁" come four <0xNN> byte pieces; the text appears with the last.
    ids = spm.encode("🦙!", add_special_tokens=False)
    assert [spm.decode([i]) for i in ids[1:5]] == ["\ufffd"] * 4
    assert stream(spm, ids) == ["", "", "", "", "🦙", "!", ""]


def test_streaming_detokenizer_truncated_character(gguf_tokenizer):
    bpe = gguf_tokenizer("gpt-2")
    ids = bpe.encode("🦙", add_special_tokens=False)[:-1]  # the last byte never comes
    assert stream(bpe, ids) == [""] * len(ids) + [bpe.decode(ids)]
    assert bpe.decode(ids) == "\ufffd"


# --- mlx-lm -------------------------------------------------------------------------------------------


def test_mlx_lm_tokenizer_wrapper(chat_tokenizer):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    wrapper = tokenizer_utils.TokenizerWrapper(chat_tokenizer)
    messages = [{"role": "user", "content": "Grüße 🦙"}]
    ids = wrapper.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert wrapper.has_chat_template and 50256 in wrapper.eos_token_ids
    assert wrapper.encode("Hi") == chat_tokenizer.encode("Hi")
    detokenizer = wrapper.detokenizer
    for i in ids:
        detokenizer.add_token(i)
    detokenizer.finalize()
    assert detokenizer.text == chat_tokenizer.decode(ids)
