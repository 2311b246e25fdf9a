"""The `mlxfam` command, run as the installed console script, and the chat session behind it.

Tests marked `end_to_end` load SmolLM2-135M through the whole library (hub, loader, GGUF,
tokenizer, generation), so they fail while any of those parts is missing or broken.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from commands import mlxfam_command
from mlxfam_apps.chat import ChatSession, run_chat

import mlxfam
from mlxfam import hub

CAPITAL_QUESTION = "What is the capital of France?"


def run(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([mlxfam_command(), *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_help():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("generate", "chat", "list", "inspect"):
        assert command in result.stdout


def test_python_dash_m(tmp_path):
    # From elsewhere than the checkout, so `-m` finds the installed package.
    result = subprocess.run(
        [sys.executable, "-m", "mlxfam_apps", "generate", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "--max-kv-size" in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temp", "-1"], "mlxfam: error: temp must be >= 0, got -1.0"),
        (["--top-p", "0"], "mlxfam: error: top_p must be in (0, 1]"),
        (["--top-k", "-2"], "mlxfam: error: top_k must be an integer >= 0"),
        (["--min-p", "2"], "mlxfam: error: min_p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "mlxfam: error: repetition_penalty must be > 0"),
        (["--max-tokens", "-1"], "mlxfam: error: max_tokens must be an integer >= 0, got -1"),
        (["--max-kv-size", "0"], "mlxfam: error: max_kv_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_flags_fail_before_loading(flags, message):
    # A model that does not exist: the flags must be rejected before anything is loaded.
    assert_clean_error(run("generate", "./no-such-model", "-p", "hi", *flags), message)


def test_missing_model_path():
    assert_clean_error(run("generate", "./no-such-model.gguf", "-p", "hi"), "no such file or directory")


def test_unknown_alias_suggests():
    result = run("chat", "smollm-135m", stdin="hi\n")
    assert_clean_error(result, "mlxfam: error: unknown model 'smollm-135m'. Did you mean: smollm2-135m")


@pytest.mark.end_to_end
def test_generate_answers(smollm2_gguf):
    result = run("generate", "smollm2-135m", "-p", CAPITAL_QUESTION, "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens-per-sec" in result.stderr and "Peak memory" in result.stderr


@pytest.mark.end_to_end
def test_chat_from_a_pipe(smollm2_gguf):
    result = run("chat", "smollm2-135m", "--max-tokens", "20", stdin=CAPITAL_QUESTION + "\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert ">>>" not in result.stdout + result.stderr  # no prompt noise when piped


@pytest.mark.end_to_end
def test_chat_two_turns_and_reset(smollm2_gguf):
    turns = f"{CAPITAL_QUESTION}\n/reset\nWhat is the capital of Germany?\n"
    result = run("chat", "smollm2-135m", "--max-tokens", "20", stdin=turns)
    assert result.returncode == 0, result.stderr
    paris, berlin = result.stdout.index("Paris"), result.stdout.index("Berlin")
    assert paris < berlin


@pytest.mark.end_to_end
def test_inspect(smollm2_gguf):
    result = run("inspect", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert "(q_proj)" in result.stdout
    assert "parameters: " in result.stdout and "tokenizer: " in result.stdout


@pytest.mark.end_to_end
def test_list_shows_download(smollm2_gguf):
    result = run("list")
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("smollm2-135m ")]
    assert not row.endswith(" no"), row


def test_list_shows_cached_ggufs(tmp_path):
    split = tmp_path / "hf" / "models--owner--name-GGUF" / "snapshots" / ("a" * 40)
    split.mkdir(parents=True)
    for part in (1, 2):
        (split / f"name-Q8_0-{part:05d}-of-00002.gguf").write_bytes(b"G" * 1_500_000)
    (tmp_path / "hf" / "models--owner--name-GGUF" / "refs").mkdir()
    (tmp_path / "hf" / "models--owner--name-GGUF" / "refs" / "main").write_text("a" * 40)
    (tmp_path / "mlxfam" / "mine").mkdir(parents=True)
    (tmp_path / "mlxfam" / "mine" / "model-IQ4_XS.gguf").write_bytes(b"G" * 2_000_000)
    env = {**os.environ, "MLXFAM_CACHE": str(tmp_path / "mlxfam"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    result = subprocess.run([mlxfam_command(), "list"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[len(hub.ALIASES) + 1 :]
    assert lines[:2] == ["", "Cached GGUF files:"]
    mine = str(tmp_path / "mlxfam" / "mine" / "model-IQ4_XS.gguf")
    assert [line.split() for line in lines[2:]] == [
        ["TAG", "SIZE", "REFERENCE", "PATH"],
        ["Q8_0", "3.0", "MB", "owner/name-GGUF:Q8_0", str(split / "name-Q8_0-00001-of-00002.gguf"), "(2", "parts)"],
        ["IQ4_XS", "2.0", "MB", mine, mine],
    ]


@pytest.mark.end_to_end
def test_chat_session_reuses_the_cache(smollm2_gguf):
    model, tokenizer = mlxfam.load(str(smollm2_gguf))
    session = ChatSession(model, tokenizer, max_tokens=20)
    session.send(CAPITAL_QUESTION)
    held = len(session.held_ids())
    second = session.send("And of Germany?")
    assert "Berlin" in session.messages[-1]["content"]
    # Only the new turn was prefilled: the first turn and its reply came from the cache.
    assert second.prompt_tokens == len(session.prompt_ids(session.messages[:-1])) - held


class FakeLayerCache:
    def __init__(self):
        self.offset = 0


class FakeModel:
    def make_cache(self, options=None):
        return [FakeLayerCache(), FakeLayerCache()]


class FakeTokenizer:
    """One id per character; the template writes `<role>content` for each message."""

    chat_template = "fake"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [ord(c) for c in text]

    def encode(self, text):
        return [ord(c) for c in text]


@pytest.fixture
def fake_generation(monkeypatch):
    """stream_generate that answers "ok" and records what it was asked to prefill."""
    prefilled = []

    def stream_generate(model, tokenizer, prompt, cache=None, **kwargs):
        prefilled.append("".join(map(chr, prompt)))
        for layer in cache:
            layer.offset += len(prompt)
        for n, piece in enumerate("ok", start=1):
            for layer in cache:
                layer.offset += 1
            yield SimpleNamespace(text=piece, token=ord(piece), generation_tokens=n)

    monkeypatch.setattr(mlxfam, "stream_generate", stream_generate, raising=False)
    return prefilled


def test_session_prefills_only_the_new_turn(fake_generation):
    session = ChatSession(FakeModel(), FakeTokenizer(), system="be brief")
    session.send("hi")
    session.send("again")
    assert fake_generation == ["<system>be brief<user>hi<assistant>", "<user>again<assistant>"]
    assert session.messages[-1] == {"role": "assistant", "content": "ok"}


def test_session_rebuilds_the_cache_when_the_prompt_changes(fake_generation):
    session = ChatSession(FakeModel(), FakeTokenizer())
    session.send("hi")
    session.system = "new"
    session.send("again")
    assert fake_generation[-1] == "<system>new<user>hi<assistant>ok<user>again<assistant>"
    session.reset()
    session.send("fresh")
    assert fake_generation[-1] == "<system>new<user>fresh<assistant>"  # reset keeps the system prompt
    assert len(session.messages) == 2


def test_run_chat_commands(fake_generation, capsys):
    session = ChatSession(FakeModel(), FakeTokenizer())
    lines = ["hi", "", "/system pirate", "/bogus", "again", "/reset", "/quit", "never sent"]
    run_chat(session, lines, interactive=False)
    out, err = capsys.readouterr()
    assert out == "ok\nok\n"
    assert "unknown command /bogus" in err
    assert fake_generation == ["<user>hi<assistant>", "<system>pirate<user>hi<assistant>ok<user>again<assistant>"]
    assert session.messages == [] and session.system == "pirate"
