"""The layer order of DESIGN.md, checked by import-linter against the contracts in
pyproject.toml ([tool.importlinter]): a transport imports no other transport, and nothing
imports from a layer above its own. Every broken contract fails here with lint-imports' report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail(f"no {lint_imports}: pip install -e '.[test]' installs import-linter")
    result = subprocess.run([str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache",
                             "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
