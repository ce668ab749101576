"""The Go caller (clients/go/main.go), built offline from Debian's Go, grpc-go, protobuf-go and
genproto by clients/go/build-offline.sh, against a live `sidecar serve`: what it prints must
be what the Python client gets for the same calls, replies and refusals alike."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.polyglot import (
    PROMPT,
    PROTOS,
    ROOT,
    assert_same,
    cached_build,
    caller_answers,
    go_code,
    python_answers,
    run_caller,
    serving,
    summary_lines,
)
from tools.protogen import googleapis_include

CLIENT = ROOT / "clients" / "go"
GOCODE = Path("/usr/share/gocode/src")


def missing_package() -> str | None:
    """The first Debian package the offline build needs that is not installed."""
    protobuf_v1 = GOCODE / "github.com/golang/protobuf/go.mod"
    needs = {
        "golang-go": shutil.which("go"),
        "protobuf-compiler": shutil.which("protoc"),
        "protoc-gen-go-grpc": shutil.which("protoc-gen-go-grpc"),
        "golang-google-grpc-dev": (GOCODE / "google.golang.org/grpc").is_dir(),
        "golang-google-protobuf-dev": (GOCODE / "google.golang.org/protobuf/cmd").is_dir(),
        "golang-google-genproto-dev": (GOCODE / "google.golang.org/genproto/googleapis").is_dir(),
        # grpc-go 1.33 marshals through github.com/golang/protobuf. Debian's 1.3 of it cannot
        # decode protobuf-go 1.28's messages (it panics); 1.5 hands them to protobuf-go.
        "golang-github-golang-protobuf-1-5-dev": protobuf_v1.is_file()
        and "google.golang.org/protobuf" in protobuf_v1.read_text(),
    }
    return next((package for package, found in needs.items() if not found), None)


MISSING = missing_package()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MISSING is not None,
        reason=f"Debian package {MISSING} is missing: `make debian-tools` installs it",
    ),
]


@pytest.fixture(scope="session")
def go_caller() -> Path:
    """The caller built by build-offline.sh, kept under .cache/ by a digest of its inputs."""
    return cached_build(
        ROOT / ".cache" / "go-client" / "sidecar-example",
        [*sorted(CLIENT.glob("*.go")), *PROTOS],
        subprocess.check_output(["go", "version"]),
        CLIENT / "build-offline.sh",
        {
            "PROTO_DEPS": str(googleapis_include()),
            "GOCACHE": str(ROOT / ".cache" / "go-build"),
        },
    )


def test_go_client_against_a_live_sidecar(
    go_caller: Path, minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    with serving(tmp_path, minilm_dir, classifier_dir, gpt2_dir) as address:
        served = python_answers(address, "triage", "gpt2", go_code)
        flags = ("-classify-model", "triage", "-generate-model", "gpt2", "-prompt", PROMPT)
        assert_same(caller_answers([go_caller, "-json", *flags], address), served, "served")
        # No model flags: Classify and Generate go to the default, an embedding model, and
        # are refused (the stream on its first Recv).
        refused = python_answers(address, "", "", go_code)
        assert_same(caller_answers([go_caller, "-json"], address), refused, "refused")
        # The summary users see, for the same calls.
        summary = run_caller([go_caller], address)

    assert served["Generate"]["finishReason"] == "FINISH_REASON_LENGTH"
    for call in ("Classify", "Generate"):
        assert refused[call]["code"] == "FailedPrecondition"
    assert summary.returncode == 1, summary.stdout + summary.stderr
    lines = re.sub(r"\d+ µs", "N µs", summary.stdout).splitlines()
    assert lines == summary_lines(refused), summary.stdout
