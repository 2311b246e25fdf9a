"""The installed `mlxfam` command, for tests that run it as a user would."""

import shutil
import sys
from pathlib import Path


def mlxfam_command() -> str:
    # The script installed next to this Python: the package under test, not the checkout.
    script = shutil.which("mlxfam", path=str(Path(sys.executable).parent)) or shutil.which("mlxfam")
    assert script, "no `mlxfam` command: install the package first (pip install '.[test]')"
    return script
