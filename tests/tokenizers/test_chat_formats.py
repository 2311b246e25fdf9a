"""Tokenizers and chat prompts of the families whose repositories ship them as Python code (Qwen 1, ChatGLM 1/2/3,
Baichuan 1/2, InternLM 1/2, MiniCPM), checked against tiktoken and SentencePiece run directly and against the prompt
layouts of docs/families.md written out by hand.

Qwen 1 and InternLM use their real vocabulary files. The others get a small SentencePiece model trained here, with
the pieces their tokenizer code relies on put at the ids the original files have them (Baichuan's
<reserved_106>/<reserved_107> at 195/196, ChatGLM2/3's 64789 pieces, InternLM2's 92542/92543)."""

import base64
import io
import json
import lzma
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from mlxfam_apps.chat import render_prompt
from sentencepiece import sentencepiece_model_pb2

from mlxfam.errors import MlxfamError
from mlxfam.models.internlm2 import DEFAULT_SYSTEM as INTERNLM2_DEFAULT_SYSTEM
from mlxfam.tokenizer import load_tokenizer

DATA = Path(__file__).parents[1] / "data"
TOKENIZERS = DATA / "tokenizers"

CORPUS = [
    "Hello world, this is a small corpus for a tokenizer test.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "你好，世界！今天天气很好。我们一起学习。北京是中国的首都。",
    "问：你是谁？答：我是一个人工智能助手。用户 助手 系统",
    "def f(x):\n    return x + 1  # code with    spaces",
]
USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
UNUSED = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED


def train_sentencepiece(**options) -> bytes:
    """A Llama-style BPE SentencePiece model (byte fallback, no normalization): <unk> 0, <s> 1, </s> 2, then
    `control_symbols` and `user_defined_symbols` in order, then the byte pieces and the learned ones."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=options.pop("vocab_size", 500),
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def with_pieces(model: bytes, size: int, placed: dict[int, str]) -> bytes:
    """`model` grown to `size` pieces: user-defined `placed` pieces at their ids, the model's own pieces in order
    around them, never-produced (UNUSED) fillers after those."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    own = list(proto.pieces)
    del proto.pieces[:]
    for i in range(size):
        if i in placed:
            proto.pieces.add(piece=placed[i], score=0.0, type=USER_DEFINED)
        elif own:
            proto.pieces.append(own.pop(0))
        else:
            proto.pieces.add(piece=f"<filler_{i}>", score=0.0, type=UNUSED)
    assert not own, "size leaves no room for the model's own pieces"
    return proto.SerializeToString()


def write_dir(directory: Path, files: dict[str, bytes | dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else json.dumps(content, ensure_ascii=False).encode()
        (directory / name).write_bytes(data)
    return directory


def processor(model: bytes) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_proto=model)


def chat(tokenizer, messages, **kwargs):
    """(ids, text) of the prompt that opens the assistant's reply."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    return ids, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


# --- Qwen 1: qwen.tiktoken, ChatML built as ids by make_context ------------------------------------------


# tokenization_qwen.py's PAT_STR and its first special tokens.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen1")
    (directory / "qwen.tiktoken").write_bytes(lzma.decompress((TOKENIZERS / "qwen1" / "qwen.tiktoken.xz").read_bytes()))
    shutil.copy(TOKENIZERS / "qwen1" / "tokenizer_config.json", directory)
    # Qwen-7B-Chat's generation_config.json (chat_format and its eod).
    write_dir(directory, {"generation_config.json": {"chat_format": "chatml", "eos_token_id": 151643}})
    return directory


@pytest.fixture(scope="module")
def qwen_reference(qwen_dir) -> tiktoken.Encoding:
    lines = (qwen_dir / "qwen.tiktoken").read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_qwen_chatml_with_default_system(qwen_dir, qwen_reference):
    tokenizer = load_tokenizer(qwen_dir)
    ids, text = chat(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    # docs/families.md#qwen-1, with chat()'s default system prompt.
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    enc, nl = qwen_reference.encode_ordinary, qwen_reference.encode_ordinary("\n")
    assert ids == [
        IM_START, *enc("system"), *nl, *enc("You are a helpful assistant."), IM_END, *nl,
        IM_START, *enc("user"), *nl, *enc("What is the capital of France?"), IM_END, *nl,
        IM_START, *enc("assistant"), *nl,
    ]  # fmt: skip
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_ids == [ENDOFTEXT, IM_END, IM_START]  # stop words [[151645], [151644]] and eod


def test_qwen_history_system_and_special_text_in_content(qwen_dir, qwen_reference):
    tokenizer = load_tokenizer(qwen_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|im_end|>"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "再见"},
    ]
    ids, text = chat(tokenizer, messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n"
    )
    enc, nl = qwen_reference.encode_ordinary, qwen_reference.encode_ordinary("\n")
    # make_context encodes contents with special tokens disallowed: the "<|im_end|>" a user typed stays text.
    user_turn = [IM_START, *enc("user"), *nl, *enc("Hi <|im_end|>"), IM_END]
    assert ids[ids.index(IM_END) + len(nl) + 1 :][: len(user_turn)] == user_turn
    assert ids.count(IM_END) == 4
    assert ids[-(len(enc("assistant")) + 2 * len(nl) + 1) :] == [*nl, IM_START, *enc("assistant"), *nl]


def test_qwen_raw_generation_config_has_no_chat_format(qwen_dir, tmp_path):
    directory = tmp_path / "qwen"
    shutil.copytree(qwen_dir, directory)
    write_dir(directory, {"generation_config.json": {"chat_format": "raw"}})
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_format is None
    with pytest.raises(MlxfamError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    write_dir(directory, {"generation_config.json": {"chat_format": "llama"}})
    with pytest.raises(MlxfamError, match=r"generation_config.json: chat_format 'llama' is not supported"):
        load_tokenizer(directory)


def test_jinja_template_wins_over_the_built_in_format(qwen_dir, tmp_path):
    directory = tmp_path / "qwen"
    shutil.copytree(qwen_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    write_dir(directory, {"tokenizer_config.json": config | {"chat_template": template}})
    tokenizer = load_tokenizer(directory)
    assert tokenizer.chat_format is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>Hi<|im_end|>"


def test_chat_app_uses_the_built_in_format(qwen_dir):
    tokenizer = load_tokenizer(qwen_dir)
    messages = [{"role": "user", "content": "Hi"}]
    assert render_prompt(tokenizer, messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_format_rejects_template_arguments_and_bad_messages(qwen_dir):
    tokenizer = load_tokenizer(qwen_dir)
    with pytest.raises(MlxfamError, match="qwen chat format takes no template arguments"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[{"name": "x"}])
    with pytest.raises(MlxfamError, match="role 'tool' is not supported by the Qwen format"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(MlxfamError, match="chat message 1: the Qwen format takes no system message"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}])
    with pytest.raises(MlxfamError, match="chat message 0 must be a dict"):
        tokenizer.apply_chat_template([{"role": "user", "content": ["parts"]}])


# --- InternLM (v1): tokenizer.model, "<|User|>:...<eoh>" text tokenized with BOS --------------------------


@pytest.fixture(scope="module")
def internlm_model(tmp_path_factory) -> bytes:
    return lzma.decompress((TOKENIZERS / "internlm" / "tokenizer.model.xz").read_bytes())


# internlm-20b's tokenizer_config.json before the third-party "use llama" conversion (yangulei mirror @c56a729).
INTERNLM_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "pad_token": "</s>",
    "tokenizer_class": "InternLMTokenizer",
    "unk_token": "<unk>",
}


def test_internlm_prompt(internlm_model, tmp_path):
    tokenizer = load_tokenizer(
        write_dir(tmp_path, {"tokenizer.model": internlm_model, "tokenizer_config.json": INTERNLM_CONFIG})
    )
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "你好"},
    ]
    ids, text = chat(tokenizer, messages)
    assert text == "<|User|>:Hello<eoh>\n<|Bot|>:Hi, how can I help?<eoa>\n<|User|>:你好<eoh>\n<|Bot|>:"
    assert ids == [1, *processor(internlm_model).encode(text)]  # BOS added by the tokenizer
    # Stop on </s>, <eoa> 103028 and <eoh> 103027 (docs/families.md#internlm, lmdeploy's stop ids).
    assert tokenizer.eos_token_ids == [2, 103028, 103027]
    with pytest.raises(MlxfamError, match="InternLM format takes no system message at all"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, *messages])


# --- InternLM2: ChatML with ids 92543/92542 and the meta instruction --------------------------------------


@pytest.fixture(scope="module")
def internlm2_model() -> bytes:
    # The first internlm2-chat-7b files spell <|im_start|> 92543 and <|im_end|> 92542 as unused tokens.
    return with_pieces(train_sentencepiece(), 92544, {92542: "[UNUSED_TOKEN_145]", 92543: "[UNUSED_TOKEN_146]"})


def test_internlm2_first_release(internlm2_model, tmp_path):
    files = {
        "tokenizer.model": internlm2_model,
        "tokenizer_config.json": INTERNLM_CONFIG,  # its first release shipped InternLM's tokenizer class
        "config.json": {"model_type": "internlm2", "eos_token_id": 2},
    }
    tokenizer = load_tokenizer(write_dir(tmp_path, files))
    ids, text = chat(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text == (
        f"[UNUSED_TOKEN_146]system\n{INTERNLM2_DEFAULT_SYSTEM}[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )
    assert INTERNLM2_DEFAULT_SYSTEM.startswith("You are an AI assistant whose name is InternLM (书生·浦语)")
    assert ids == [1, *processor(internlm2_model).encode(text)]
    assert ids.count(92543) == 3 and ids.count(92542) == 2
    assert tokenizer.eos_token_ids == [2, 92542]


def test_internlm2_named_chatml_tokens_and_literal_bos(internlm2_model, tmp_path):
    # Later files name 92543/92542 in added_tokens_decoder; with add_bos_token false build_inputs writes "<s>".
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "add_bos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "added_tokens_decoder": {
            "92543": {"content": "<|im_start|>", "special": True},
            "92542": {"content": "<|im_end|>", "special": True},
        },
    }
    files = {"tokenizer.model": internlm2_model, "tokenizer_config.json": config}
    tokenizer = load_tokenizer(write_dir(tmp_path, files))
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    ids, text = chat(tokenizer, messages)
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # an empty system drops the block
    sp = processor(internlm2_model)
    # HF's slow tokenizer splits at special tokens and encodes each piece of text on its own.
    assert ids == [1, 92543, *sp.encode("user\nHi"), 92542, *sp.encode("\n"), 92543, *sp.encode("assistant\n")]


# --- Baichuan 1/2: build_chat_input's ids ------------------------------------------------------------------


@pytest.fixture(scope="module")
def baichuan_model() -> bytes:
    return with_pieces(train_sentencepiece(), 600, {195: "<reserved_106>", 196: "<reserved_107>"})


def baichuan_config(add_bos_token: bool | None) -> dict:
    """Baichuan2-13B-Chat's tokenizer_config.json (AddedToken dicts); Baichuan 1's lacks add_bos_token."""
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": True}
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": token | {"content": "<s>"},
        "eos_token": token | {"content": "</s>"},
        "pad_token": token | {"content": "<unk>"},
        "unk_token": token | {"content": "<unk>"},
        "tokenizer_class": "BaichuanTokenizer",
        "model_max_length": 4096,
    }
    return config if add_bos_token is None else config | {"add_bos_token": add_bos_token, "add_eos_token": False}


BAICHUAN_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.mark.parametrize("add_bos_token", [False, None], ids=["baichuan2", "baichuan1-default-bos"])
def test_baichuan_chat_input(baichuan_model, tmp_path, add_bos_token):
    files = {
        "tokenizer.model": baichuan_model,
        "tokenizer_config.json": baichuan_config(add_bos_token),
        "generation_config.json": {"eos_token_id": 2, "user_token_id": 195, "assistant_token_id": 196},
    }
    tokenizer = load_tokenizer(write_dir(tmp_path, files))
    sp = processor(baichuan_model)
    # Each text goes through tokenizer.encode: BaichuanTokenizer's add_bos_token defaults to true, so a config
    # without the flag (Baichuan 1) puts <s> before every part.
    bos = [] if add_bos_token is False else [1]
    system, q1, a1, q2 = (bos + sp.encode(m["content"]) for m in BAICHUAN_MESSAGES)
    ids = tokenizer.apply_chat_template(BAICHUAN_MESSAGES, add_generation_prompt=True)
    assert ids == [*system, 195, *q1, 196, *a1, 195, *q2, 196]
    assert [sp.id_to_piece(i) for i in (195, 196)] == ["<reserved_106>", "<reserved_107>"]
    # A conversation ending with the assistant's turn gets no further opening.
    assert tokenizer.apply_chat_template(BAICHUAN_MESSAGES[:3], add_generation_prompt=True) == [
        *system, 195, *q1, 196, *a1
    ]  # fmt: skip
    assert tokenizer.eos_token_ids == [2]


def test_baichuan_role_ids_come_from_generation_config(baichuan_model, tmp_path):
    files = {
        "tokenizer.model": baichuan_model,
        "tokenizer_config.json": baichuan_config(False),
        "generation_config.json": {"user_token_id": 7, "assistant_token_id": 8},
    }
    tokenizer = load_tokenizer(write_dir(tmp_path, files))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids == [7, *processor(baichuan_model).encode("Hi"), 8]
    (tmp_path / "generation_config.json").unlink()  # absent: Baichuan's 195/196
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0] == 195
    write_dir(tmp_path, {"generation_config.json": {"user_token_id": 600}})
    with pytest.raises(MlxfamError, match=r"generation_config.json: user_token_id = 600 is not a token id"):
        load_tokenizer(tmp_path)


# --- ChatGLM-6B (v1): icetk ice_text.model, [gMASK] <sop> appended ----------------------------------------

ICETK_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
ICETK_WHITESPACE = ["<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, 81))]

# THUDM/chatglm-6b's final tokenizer_config.json.
CHATGLM1_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "num_image_tokens": 0,
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


@pytest.fixture(scope="module")
def icetk_model() -> bytes:
    return train_sentencepiece(
        vocab_size=700,
        pad_id=3,
        pad_piece="<pad>",
        control_symbols=ICETK_SPECIALS,
        user_defined_symbols=ICETK_WHITESPACE,
    )


def test_chatglm1_whitespace_tokens_and_gmask_sop_suffix(icetk_model, tmp_path):
    tokenizer = load_tokenizer(
        write_dir(tmp_path, {"ice_text.model": icetk_model, "tokenizer_config.json": CHATGLM1_CONFIG})
    )
    sp = processor(icetk_model)
    gmask, sop, eop = (sp.piece_to_id(piece) for piece in ("[gMASK]", "<sop>", "<eop>"))
    text = "def f(x):\n\treturn x   # three spaces"
    # SPTokenizer writes "\n", "\t" and runs of spaces as tokens before SentencePiece sees the text.
    expected = sp.encode("def f(x):<n><|tab|>return x<|blank_3|># three spaces")
    assert tokenizer.encode(text) == [*expected, gmask, sop]
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_ids) == ("<sop>", "<eop>", [eop])


def test_chatglm1_rounds(icetk_model, tmp_path):
    tokenizer = load_tokenizer(
        write_dir(tmp_path, {"ice_text.model": icetk_model, "tokenizer_config.json": CHATGLM1_CONFIG})
    )
    sp = processor(icetk_model)
    gmask, sop = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")
    first = [{"role": "user", "content": "你好"}]
    ids, text = chat(tokenizer, first)
    assert (text, ids) == ("你好", [*sp.encode("你好"), gmask, sop])  # the first turn is the bare query
    messages = [*first, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "Paris?"}]
    ids, text = chat(tokenizer, messages)
    assert text == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：Paris?\n答："  # rounds from 0
    assert ids == [*sp.encode("[Round 0]<n>问：你好<n>答：你好！<n>[Round 1]<n>问：Paris?<n>答："), gmask, sop]
    with pytest.raises(MlxfamError, match="ChatGLM-6B format takes no system message"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, *first])
    with pytest.raises(MlxfamError, match="user and assistant turns alternating"):
        tokenizer.apply_chat_template([*first, *first])


def test_chatglm1_image_token_offset(icetk_model, tmp_path):
    # The first release's config has no num_image_tokens: the tokenizer's default 20000 image ids come first.
    config = {k: v for k, v in CHATGLM1_CONFIG.items() if k != "num_image_tokens"}
    tokenizer = load_tokenizer(write_dir(tmp_path, {"ice_text.model": icetk_model, "tokenizer_config.json": config}))
    sp = processor(icetk_model)
    assert tokenizer.encode("Hello") == [
        20000 + i for i in [*sp.encode("Hello"), sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]
    ]
    assert tokenizer.decode([5, *tokenizer.encode("Hello", add_special_tokens=False)]) == "Hello"


# --- ChatGLM2 / ChatGLM3: tokenizer.model plus specials from 64789, [gMASK] sop prefixed ----------------


@pytest.fixture(scope="module")
def glm2_model() -> bytes:
    return with_pieces(train_sentencepiece(), 64789, {})  # 64789 pieces, as chatglm2/3-6b's tokenizer.model


def glm_dir(directory: Path, model: bytes, name_or_path: str) -> Path:
    config = {
        "name_or_path": name_or_path,
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    return write_dir(
        directory,
        {
            "tokenizer.model": model,
            "tokenizer_config.json": config,
            "config.json": {"model_type": "chatglm", "eos_token_id": 2},
        },
    )


def test_chatglm2_prefix_and_rounds(glm2_model, tmp_path):
    tokenizer = load_tokenizer(glm_dir(tmp_path, glm2_model, "THUDM/chatglm2-6b"))
    sp = processor(glm2_model)
    # docs/families.md#chatglm2: [MASK] 64789, [gMASK] 64790, [sMASK] 64791, sop 64792, eop 64793; prefix [gMASK] sop.
    assert tokenizer.encode("Hello") == [64790, 64792, *sp.encode("Hello")]
    assert tokenizer.encode("[gMASK]sop", add_special_tokens=False) == sp.encode("[gMASK]sop")  # never text-matched
    assert tokenizer.decode([64789, 64793], skip_special_tokens=True) == ""
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "Paris?"},
    ]
    ids, text = chat(tokenizer, messages)
    assert text == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：Paris?\n\n答："  # rounds from 1
    assert ids == [64790, 64792, *sp.encode(text)]
    assert chat(tokenizer, messages[:1])[1] == "[Round 1]\n\n问：你好\n\n答："
    assert tokenizer.eos_token_ids == [2]


def test_chatglm3_chat_input(glm2_model, tmp_path):
    tokenizer = load_tokenizer(glm_dir(tmp_path, glm2_model, "THUDM/chatglm3-6b"))
    sp = processor(glm2_model)
    tools = [{"name": "weather", "parameters": {"city": "str"}}]
    messages = [
        {"role": "system", "content": "Answer briefly.", "tools": tools},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "weather", "content": "tool_call(city='Paris')"},
        {"role": "observation", "content": "sunny"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # docs/families.md#chatglm3: <|system|> 64794, <|user|> 64795, <|assistant|> 64796, <|observation|> 64797.
    system = "Answer briefly.\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    assert ids == [
        64790, 64792,
        64794, *sp.encode("\n"), *sp.encode(system),
        64795, *sp.encode("\n"), *sp.encode("Weather in Paris?"),
        64796, *sp.encode("weather\n"), *sp.encode("tool_call(city='Paris')"),
        64797, *sp.encode("\n"), *sp.encode("sunny"),
        64796,
    ]  # fmt: skip
    assert tokenizer.eos_token_ids == [2, 64795, 64797]  # eos, <|user|>, <|observation|>
    # Untokenized, an id format gives the text of its ids.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == tokenizer.decode(ids)
    assert text.startswith("[gMASK]sop<|system|>") and text.endswith("sunny<|assistant|>")


def test_chatglm2_or_3_must_be_named(glm2_model, tmp_path):
    with pytest.raises(MlxfamError, match="cannot tell ChatGLM2 from ChatGLM3.*'my-finetune'"):
        load_tokenizer(glm_dir(tmp_path, glm2_model, "my-finetune"))


# --- MiniCPM: the <用户>/<AI> template, tokenized with BOS as chat() does ------------------------------------

# MiniCPM-2B-sft's chat template.
MINICPM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<用户>' + message['content'].strip() + "
    "'<AI>'}}{% else %}{{message['content'].strip()}}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def minicpm_model() -> bytes:
    return train_sentencepiece(user_defined_symbols=["<用户>", "<AI>"])


@pytest.mark.parametrize("template", [None, MINICPM_TEMPLATE], ids=["built-in", "repository-template"])
def test_minicpm_prompt(minicpm_model, tmp_path, template):
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    files = {
        "tokenizer.model": minicpm_model,
        "tokenizer_config.json": config | ({"chat_template": template} if template else {}),
        "config.json": {"model_type": "minicpm", "eos_token_id": 2},
    }
    tokenizer = load_tokenizer(write_dir(tmp_path, files))
    messages = [
        {"role": "user", "content": " 你好 "},
        {"role": "assistant", "content": "你好！\n"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids, text = chat(tokenizer, messages)
    assert text == "<用户>你好<AI>你好！<用户>What is the capital of France?<AI>"
    sp = processor(minicpm_model)
    assert ids == [1, *sp.encode(text)]  # chat() tokenizes the prompt text with BOS
    assert tokenizer.eos_token_ids == [2, sp.piece_to_id("<用户>"), sp.piece_to_id("<AI>")]


# --- recognition --------------------------------------------------------------------------------------------


def test_unimplemented_remote_tokenizer_class_is_refused(minicpm_model, tmp_path):
    config = {
        "tokenizer_class": "ChatGLM4Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
    }
    write_dir(tmp_path, {"tokenizer.model": minicpm_model, "tokenizer_config.json": config})
    with pytest.raises(MlxfamError, match=r"tokenizer_config.json: tokenizer class 'ChatGLM4Tokenizer' is Python code"):
        load_tokenizer(tmp_path)
    # Named only by config.json's auto_map.
    write_dir(tmp_path, {
        "tokenizer_config.json": {},
        "config.json": {"auto_map": {"AutoTokenizer": "tokenization_xverse.XverseTokenizer"}},
    })  # fmt: skip
    with pytest.raises(MlxfamError, match=r"config.json: tokenizer class 'XverseTokenizer' is Python code"):
        load_tokenizer(tmp_path)


def test_transformers_class_named_besides_shipped_code_is_used(minicpm_model, tmp_path):
    # transformers, not trusting remote code, uses the named class of its own; so does mlxfam.
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_xverse.XverseTokenizer", None]},
    }
    tokenizer = load_tokenizer(write_dir(tmp_path, {"tokenizer.model": minicpm_model, "tokenizer_config.json": config}))
    assert tokenizer.encode("Hello") == [1, *processor(minicpm_model).encode("Hello")]
    assert tokenizer.chat_format is None


@pytest.mark.parametrize(
    "variant", ["qwen1", "chatglm1", "chatglm2", "chatglm3", "baichuan2_13b", "internlm1", "internlm2", "minicpm"]
)
def test_checkpoint_without_tokenizer_files(variant):
    # The golden checkpoints carry these families' configs (model_type, auto_map) but no tokenizer files.
    assert load_tokenizer(DATA / "golden" / variant) is None
