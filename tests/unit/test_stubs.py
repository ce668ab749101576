"""The committed stubs in sidecar/v1 and docs/api.md are exactly what `make proto` generates
now. (That every declaration is commented is buf lint's job: tests/contract/test_buf.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, ROOT / "tools" / "protogen.py", "--out", tmp_path],
        check=True,
        capture_output=True,
    )
    generated = {p.name: p.read_bytes() for p in (tmp_path / "sidecar" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "sidecar" / "v1").iterdir() if p.is_file()}
    assert sorted(generated) == sorted(committed), "run `make proto` and commit sidecar/v1"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit sidecar/v1"


def test_api_reference_matches_the_proto_comments() -> None:
    from tools.apidoc import OUT, descriptors, render

    assert render(descriptors()) == OUT.read_text(), "run `make proto` and commit docs/api.md"
