"""The Go caller (clients/go) and the Java caller (clients/java) are built offline against
Debian's packages and run by tests/integration/test_go_client.py and test_java_client.py,
but not with the versions their go.mod and pom.xml pin (no module proxy, no Maven Central).
These checks hold both sources to the contract as those pinned builds would see it: every
RPC they call exists (and is read as a stream where it streams), every generated type they
name exists, every field they set or read belongs to the contract under its generated name,
and the generation configs read this repository's proto/."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from google.protobuf.descriptor import Descriptor, FileDescriptor

from sidecar.v1 import common_pb2, inference_pb2, models_pb2

ROOT = Path(__file__).resolve().parents[2]
GO = (ROOT / "clients" / "go" / "main.go").read_text()
JAVA = next((ROOT / "clients" / "java" / "src").rglob("Main.java")).read_text()
FILES: list[FileDescriptor] = [
    common_pb2.DESCRIPTOR,
    inference_pb2.DESCRIPTOR,
    models_pb2.DESCRIPTOR,
]
INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
# What the Java source calls on grpc's own classes, not on generated code.
JAVA_GRPC_GETTERS = {"Status", "Code", "Description"}


def camel(name: str) -> str:
    """protoc's CamelCase of a snake_case name (Go fields, Java accessors)."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def messages() -> list[Descriptor]:
    found: list[Descriptor] = []
    todo = [m for f in FILES for m in f.message_types_by_name.values()]
    while todo:
        message = todo.pop()
        found.append(message)
        todo += message.nested_types
    return found


MESSAGES = {m.name: m for m in messages()}
FIELDS = {camel(f.name) for m in MESSAGES.values() for f in m.fields}
ENUM_VALUES = {
    f"{enum.name}_{value.name}"
    for f in FILES
    for enum in f.enum_types_by_name.values()
    for value in enum.values
}


def test_go_calls_real_rpcs_with_real_types_and_fields() -> None:
    calls = re.findall(r"client\.(\w+)\(ctx", GO)
    assert calls, "no RPC calls found"
    for rpc in calls:
        assert rpc in INFERENCE.methods_by_name, rpc
        if INFERENCE.methods_by_name[rpc].server_streaming:
            # A server stream is read until io.EOF.
            assert "stream.Recv()" in GO
            assert "io.EOF" in GO
    generated = set(MESSAGES) | ENUM_VALUES | {"NewInferenceClient", "InferenceClient"}
    for name in re.findall(r"sidecarv1\.(\w+)", GO):
        assert name in generated, name
    for literal in re.finditer(r"&sidecarv1\.(\w+)\{(.*?)\n\t\}", GO, re.DOTALL):
        fields = {camel(f.name) for f in MESSAGES[literal[1]].fields}
        for key in re.findall(r"^\s*(\w+):", literal[2], re.MULTILINE):
            assert key in fields, f"{literal[1]}.{key}"
    for getter in re.findall(r"\.Get(\w+)\(\)", GO):
        assert getter in FIELDS, getter
    assert "status.FromError" in GO


def test_java_calls_real_rpcs_with_real_types_and_fields() -> None:
    assert "import dev.sidecar.v1." in JAVA
    stubs = re.findall(r"(\w+) = InferenceGrpc\.new(?:Blocking)?Stub\(", JAVA)
    stubs += re.findall(r"InferenceGrpc\.Inference\w*Stub (\w+)\)", JAVA)
    calls = [
        call
        for stub in set(stubs)
        for call in re.findall(rf"\b{stub}(?:\s*\.with\w+\([^()]*\))*\s*\.(\w+)\(", JAVA)
    ]
    assert calls, "no RPC calls found"
    rpcs = {
        name[:1].lower() + name[1:]: method for name, method in INFERENCE.methods_by_name.items()
    }
    for call in calls:
        assert call in rpcs, call
        if rpcs[call].server_streaming:
            assert f"Iterator<{rpcs[call].output_type.name}>" in JAVA
    for name in re.findall(r"\b([A-Z]\w+)\.newBuilder\(\)", JAVA):
        assert name in MESSAGES, name
    for field in re.findall(r"\.(?:set|add)([A-Z]\w*)\(", JAVA):
        assert field in FIELDS, field
    known = FIELDS | JAVA_GRPC_GETTERS
    for getter in re.findall(r"\.get([A-Z]\w*)\(\)", JAVA):
        # Repeated fields also have getXList() and getXCount().
        named = {getter, getter.removesuffix("List"), getter.removesuffix("Count")}
        assert named & known, getter
    assert "StatusRuntimeException" in JAVA


def test_generated_packages_match_the_protos() -> None:
    options = [f.GetOptions() for f in FILES]
    (go_package,) = {o.go_package.split(";")[0] for o in options}
    (java_package,) = {o.java_package for o in options}
    assert f'sidecarv1 "{go_package}"' in GO
    assert f"import {java_package}." in JAVA
    assert all(o.java_multiple_files for o in options)


def test_buf_generates_go_from_this_proto_dir_with_both_plugins() -> None:
    config = yaml.safe_load((ROOT / "clients" / "go" / "buf.gen.yaml").read_text())
    plugins = {p["remote"].split(":")[0] for p in config["plugins"]}
    assert plugins == {"buf.build/protocolbuffers/go", "buf.build/grpc/go"}
    inputs = [i.get("directory") for i in config["inputs"]]
    assert (ROOT / inputs[0]).resolve() == (ROOT / "proto").resolve()


def test_maven_generates_java_from_this_proto_dir_with_both_plugins() -> None:
    pom = ET.parse(ROOT / "clients" / "java" / "pom.xml").getroot()
    text = ET.tostring(pom, encoding="unicode")
    root = re.search(r"<(?:\w+:)?protoSourceRoot>([^<]+)<", text)
    assert root
    source = root[1].replace("${project.basedir}", str(ROOT / "clients" / "java"))
    assert Path(source).resolve() == (ROOT / "proto").resolve()
    for plugin in ("com.google.protobuf:protoc:", "io.grpc:protoc-gen-grpc-java:"):
        assert plugin in text, plugin
    for artifact in ("grpc-stub", "grpc-protobuf", "proto-google-common-protos"):
        assert f">{artifact}<" in text, artifact
    if "import com.google.protobuf.util." in JAVA:  # JsonFormat, for --json
        assert ">protobuf-java-util<" in text
    assert "compile-custom" in text  # the grpc plugin's goal


@pytest.mark.parametrize("client", ["go", "java"])
def test_readme_says_how_it_was_checked(client: str) -> None:
    readme = (ROOT / "clients" / client / "README.md").read_text()
    assert "TRANSFORMERS_SIDECAR_ADDRESS" in readme
    assert "build-offline.sh" in readme
    assert f"test_{client}_client.py" in readme
    assert "not compiled here" not in readme.lower()
