"""Generate the Python stubs (with type stubs) for proto/sidecar/v1 into <out>/sidecar/v1.

`make proto` runs this into the repo root; the drift test runs it into a temp dir and
compares, so the committed stubs can never fall behind the protos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("sidecar") / "v1"
INIT = '"""Generated from proto/sidecar/v1 by `make proto`. Do not edit."""\n'


def googleapis_include() -> Path:
    """Directory holding google/rpc/status.proto (shipped by googleapis-common-protos)."""
    import google.rpc.status_pb2 as status

    return Path(status.__file__).resolve().parents[2]


def generate(out: Path) -> list[Path]:
    """Write the stubs under out/sidecar/v1 and return the files written."""
    from grpc_tools import protoc

    target = out / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*_pb2*.py*"):
        stale.unlink()
    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    wkt = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{googleapis_include()}",
        f"-I{wkt}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (target / "__init__.py").write_text(INIT)
    (target / "py.typed").write_text("")
    return sorted(target.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write sidecar/v1 under")
    written = generate(parser.parse_args().out)
    print(f"wrote {len(written)} files under {PACKAGE}")


if __name__ == "__main__":
    main()
