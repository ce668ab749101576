"""The committed stubs in sidecar/v1 are exactly what `make proto` generates now."""

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


def test_every_message_field_and_rpc_is_commented() -> None:
    from google.protobuf import descriptor_pb2

    from sidecar.v1 import common_pb2, inference_pb2, models_pb2

    for module in (common_pb2, inference_pb2, models_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        # Source info is stripped from generated code; read comments from the .proto text instead.
        text = (ROOT / "proto" / module.DESCRIPTOR.name).read_text().splitlines()
        for number, line in enumerate(text):
            stripped = line.strip()
            declares = stripped.startswith(("message ", "rpc ", "enum ", "service ")) or (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("option", "syntax", "//"))
            )
            if declares:
                previous = text[number - 1].strip()
                assert previous.startswith("//"), (
                    f"{module.DESCRIPTOR.name}:{number + 1} has no comment: {stripped}"
                )
