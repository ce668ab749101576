"""The Go caller (clients/go/main.go), built offline from Debian's Go, grpc-go, protobuf-go and
genproto by clients/go/build-offline.sh, against a live `sidecar serve`: what it prints must
be what the Python client gets for the same calls, replies and refusals alike."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import missing_tool
from tests.integration.polyglot import (
    PROMPT,
    PROTOS,
    ROOT,
    cached_build,
    check_caller,
    go_code,
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


pytestmark = pytest.mark.slow


# Session scope, so that it comes before the session-scoped build below.
@pytest.fixture(scope="session", autouse=True)
def installed() -> None:
    """Skips (fails under CI) unless the Debian packages the build needs are there."""
    if (missing := missing_package()) is not None:
        missing_tool(f"Debian package {missing} is missing: `make debian-tools` installs it")


@pytest.fixture(scope="session")
def go_caller() -> Path:
    """The caller built by build-offline.sh, kept under .cache/ by a digest of its inputs."""
    # Rebuilt when Go, protoc or a Debian source package changes, not only the sources.
    packages = ["golang-google-grpc-dev", "golang-google-protobuf-dev", "protoc-gen-go-grpc"]
    packages += ["golang-github-golang-protobuf-1-5-dev", "golang-google-genproto-dev"]
    query = ["dpkg-query", "-W", *packages] if shutil.which("dpkg-query") else ["true"]
    versions = subprocess.run(query, capture_output=True).stdout
    toolchain = subprocess.check_output(["go", "version"]) + versions
    toolchain += subprocess.check_output(["protoc", "--version"])
    return cached_build(
        ROOT / ".cache" / "go-client" / "sidecar-example",
        [
            *sorted(CLIENT.glob("*.go")),
            *PROTOS,
            googleapis_include() / "google" / "rpc" / "status.proto",
        ],
        toolchain,
        CLIENT / "build-offline.sh",
        {
            "PROTO_DEPS": str(googleapis_include()),
            "GOCACHE": str(ROOT / ".cache" / "go-build"),
        },
    )


def test_go_client_against_a_live_sidecar(
    go_caller: Path, minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    # The 2 s default deadline includes connecting: on a busy CI machine that can pass it.
    check_caller(
        [go_caller, "-deadline", "30s"],
        "-json",
        ("-classify-model", "triage", "-generate-model", "gpt2", "-prompt", PROMPT),
        go_code,
        (minilm_dir, classifier_dir, gpt2_dir),
        tmp_path,
    )
