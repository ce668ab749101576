"""Contract hygiene with buf (installed by the Makefile from package-lock.json): the protos
lint clean, every declaration commented, and nothing breaks the released contract."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools.protogen import googleapis_include

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
RELEASED = sorted((ROOT / "proto" / "released").glob("v*.json"))[-1]
INFERENCE = Path("proto/sidecar/v1/inference.proto")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The buf workspace as `make contract-deps` lays it out: buf.yaml, proto/ and the
    google/rpc/status.proto it imports, copied from the pinned googleapis-common-protos."""
    assert BUF.exists(), "buf is missing: run `make install` (npm ci installs it)"
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    deps = tmp_path / "build" / "proto-deps" / "google" / "rpc"
    deps.mkdir(parents=True)
    shutil.copy(googleapis_include() / "google" / "rpc" / "status.proto", deps)
    return tmp_path


def buf(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUF, *args], cwd=workspace, capture_output=True, text=True, timeout=120)


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return buf(workspace, "breaking", "proto", "--against", str(RELEASED))


def edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / INFERENCE
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_lint_is_clean(workspace: Path) -> None:
    done = buf(workspace, "lint")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_an_uncommented_field_fails_lint(workspace: Path) -> None:
    edit(
        workspace,
        "  optional bool multi_label = 7;",
        "  optional bool multi_label = 7;\n  int32 x = 99;",
    )
    done = buf(workspace, "lint")
    assert done.returncode != 0
    assert 'Field "x" should have a non-empty comment' in done.stdout


def test_nothing_breaks_the_released_contract(workspace: Path) -> None:
    done = breaking(workspace)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        (
            "optional bool multi_label = 7;",
            "optional int32 multi_label = 7;",
            'changed type from "bool" to "int32"',
        ),
        ("optional bool multi_label = 7;", "optional bool multi_label = 17;", "deleted"),
        ("  rpc Tokenize(", "  rpc Tokens(", 'RPC "Tokenize" on service "Inference" was deleted'),
    ],
)
def test_a_breaking_change_is_caught(workspace: Path, old: str, new: str, reported: str) -> None:
    edit(workspace, old, new)
    done = breaking(workspace)
    assert done.returncode != 0
    assert reported in done.stdout


def test_an_added_field_is_not_breaking(workspace: Path) -> None:
    edit(
        workspace,
        "  optional bool multi_label = 7;",
        "  optional bool multi_label = 7;\n  // A new option.\n  optional bool added = 99;",
    )
    assert breaking(workspace).returncode == 0
