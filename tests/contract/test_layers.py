"""The layers' import contract (pyproject.toml, `make lint`) holds; an upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's packages, not the installed ones
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def copy_tree(to: Path) -> Path:
    for package in ("sidecar", "export"):
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", to / "pyproject.toml")
    return to


def test_the_layers_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    with (tree / "sidecar" / "tasks" / "embed.py").open("a") as module:
        module.write("\nimport sidecar.grpc.status  # a task reaching up into the transport\n")
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout
    assert "sidecar layers point downward BROKEN" in done.stdout
    assert "sidecar.tasks.embed -> sidecar.grpc.status" in done.stdout
