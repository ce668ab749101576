"""The Java caller (clients/java/.../Main.java), built offline from Debian's protoc,
grpc_java_plugin and grpc-java, protobuf-java and netty jars by clients/java/build-offline.sh,
against a live `sidecar serve`: what it prints must be what the Python client gets for the
same calls, replies and refusals alike."""

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
    java_code,
)

CLIENT = ROOT / "clients" / "java"
JARS = Path("/usr/share/java")
# The jars build-offline.sh compiles against and the caller runs with, by Debian package.
# libgrpc-java declares none of grpc's own dependencies, so each is named here.
PACKAGES = {
    "libgrpc-java": ["grpc-api", "grpc-context", "grpc-core", "grpc-netty", "grpc-stub"],
    "libprotobuf-java": ["protobuf", "protobuf-util"],
    "libgoogle-common-protos-java": ["proto-google-common-protos"],
    "libnetty-java": ["netty-codec-http2", "netty-handler-proxy", "netty-transport"],
    "libguava-java": ["guava"],
    "libgoogle-gson-java": ["gson"],
    "libperfmark-java": ["perfmark-api"],
    # Compile time only: @javax.annotation.Generated, and the annotations guava's classes carry.
    "libgeronimo-annotation-1.3-spec-java": ["geronimo-annotation-1.3-spec"],
    "liberror-prone-java": ["error-prone-annotations"],
}


def missing_package() -> str | None:
    """The first Debian package the offline build needs that is not installed."""
    needs: dict[str, object] = {
        "default-jdk-headless": shutil.which("javac") and shutil.which("jar"),
        "protobuf-compiler": shutil.which("protoc"),
        "protobuf-compiler-grpc-java-plugin": shutil.which("grpc_java_plugin"),
    }
    for package, jars in PACKAGES.items():
        needs[package] = all((JARS / f"{jar}.jar").is_file() for jar in jars)
    return next((package for package, found in needs.items() if not found), None)


pytestmark = pytest.mark.slow


# Session scope, so that it comes before the session-scoped build below.
@pytest.fixture(scope="session", autouse=True)
def installed() -> None:
    """Skips (fails under CI) unless the Debian packages the build needs are there."""
    if (missing := missing_package()) is not None:
        missing_tool(f"Debian package {missing} is missing: `make debian-tools` installs it")


def toolchain() -> bytes:
    """What else the jar is built from: the JDK, protoc and the Debian packages' versions."""
    javac = subprocess.run(["javac", "-version"], capture_output=True, text=True)
    protoc = subprocess.run(["protoc", "--version"], capture_output=True, text=True)
    query = ["dpkg-query", "-W", "protobuf-compiler-grpc-java-plugin", *PACKAGES]
    packages = subprocess.run(
        query if shutil.which("dpkg-query") else ["true"],
        capture_output=True,
        text=True,
    )  # without dpkg, the jars' versioned names still say which versions they are
    jars = [str((JARS / f"{jar}.jar").resolve()) for jars in PACKAGES.values() for jar in jars]
    return "\n".join([javac.stdout, javac.stderr, protoc.stdout, packages.stdout, *jars]).encode()


@pytest.fixture(scope="session")
def java_caller() -> list[str]:
    """`java -jar` the jar built by build-offline.sh, kept under .cache/ by a digest of its
    inputs."""
    jar = cached_build(
        ROOT / ".cache" / "java-client" / "sidecar-example.jar",
        [*sorted((CLIENT / "src").rglob("*.java")), *PROTOS],
        toolchain(),
        CLIENT / "build-offline.sh",
        {},
    )
    return ["java", "-jar", str(jar)]


def test_java_client_against_a_live_sidecar(
    java_caller: list[str],
    minilm_dir: Path,
    classifier_dir: Path,
    gpt2_dir: Path,
    tmp_path: Path,
) -> None:
    # The 2 s default deadline includes connecting: a cold JVM on a busy machine can pass it.
    check_caller(
        [*java_caller, "--deadline-ms=30000"],
        "--json",
        ("--classify-model=triage", "--generate-model=gpt2", f"--prompt={PROMPT}"),
        java_code,
        (minilm_dir, classifier_dir, gpt2_dir),
        tmp_path,
    )
