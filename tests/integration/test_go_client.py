"""The Go caller (clients/go/main.go), built offline from Debian's Go, grpc-go, protobuf-go and
genproto by clients/go/build-offline.sh, against a live `sidecar serve`: what it prints must
be what the Python client gets for the same calls, replies and refusals alike."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving
from tools.protogen import googleapis_include

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "go"
GOCODE = Path("/usr/share/gocode/src")
PROMPT = "The refund"
# Timings differ from call to call; everything else in the metadata must match.
TIMINGS = {"queueUs", "tokenizeUs", "inferenceUs", "postprocessUs"}


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
    inputs = sorted(CLIENT.glob("*.go")) + sorted((ROOT / "proto/sidecar/v1").glob("*.proto"))
    digest = hashlib.sha256(subprocess.check_output(["go", "version"]))
    for path in [CLIENT / "build-offline.sh", *inputs]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    binary = ROOT / ".cache" / "go-client" / f"sidecar-example-{digest.hexdigest()[:16]}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        for stale in binary.parent.glob("sidecar-example-*"):
            stale.unlink()  # built from sources since changed
        partial = binary.with_suffix(".partial")
        env = {
            **os.environ,
            "PROTO_DEPS": str(googleapis_include()),
            "GOCACHE": str(ROOT / ".cache" / "go-build"),
        }
        built = subprocess.run(
            [CLIENT / "build-offline.sh", partial], env=env, capture_output=True, text=True
        )
        assert built.returncode == 0, built.stdout + built.stderr
        partial.rename(binary)
    return binary


def as_json(message: Message) -> dict[str, Any]:
    """A reply as the proto's JSON mapping has it, as Go's protojson writes it too."""
    return json_format.MessageToDict(message)


def refusal(call: str, error: grpc.RpcError) -> dict[str, Any]:
    """A refused call as the caller's -json prints it, grpc-go's name for the code."""
    code: grpc.StatusCode = error.code()
    name = "".join(word.capitalize() for word in code.name.split("_"))  # FailedPrecondition
    return {"call": call, "code": name, "message": error.details()}


def generation(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's text and tokens joined, with the last message's finish, usage and metadata
    (how the server cuts the text into messages is not the caller's to match)."""
    text = "".join(step.get("text", "") for step in steps)
    ids = [token for step in steps for token in step.get("tokenIds", [])]
    return {**steps[-1], "text": text, "tokenIds": ids}


def python_answers(address: str, classify_model: str, generate_model: str) -> dict[str, Any]:
    """What the Python client gets for the calls main.go makes (the same requests)."""
    with grpc.insecure_channel(address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        texts = ["Refund not received", "App crashes on login"]
        answers: dict[str, Any] = {
            "Embed": as_json(inference.Embed(pb.EmbedRequest(inputs=texts, normalize=True)))
        }
        classify = pb.ClassifyRequest(
            model=classify_model, inputs=["I was charged twice this month"], top_k=3
        )
        generate = pb.GenerateRequest(
            model=generate_model, prompt=PROMPT, max_new_tokens=32, temperature=0
        )
        try:
            answers["Classify"] = as_json(inference.Classify(classify))
        except grpc.RpcError as error:
            answers["Classify"] = refusal("Classify", error)
        try:
            answers["Generate"] = generation([as_json(s) for s in inference.Generate(generate)])
        except grpc.RpcError as error:
            answers["Generate"] = refusal("Generate", error)
    return answers


def go_answers(binary: Path, address: str, *flags: str) -> dict[str, Any]:
    """The caller's -json lines by call, Generate's steps joined as for Python."""
    done = subprocess.run(
        [binary, "-json", *flags],
        env={**os.environ, "TRANSFORMERS_SIDECAR_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    answers: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        answer = json.loads(line)
        if answer["call"] == "Generate" and "reply" in answer:
            steps.append(answer["reply"])
            answers["Generate"] = generation(steps)
        else:
            answers[answer["call"]] = answer.get("reply", answer)
    refused = any("code" in answer for answer in answers.values())
    assert done.returncode == (1 if refused else 0), done.stdout + done.stderr
    return answers


def assert_same(go: object, python: object, where: str = "") -> None:
    """Equal, but for timings and floats' last bits (two forward passes may differ there)."""
    if isinstance(python, dict):
        assert isinstance(go, dict), f"{where}: {go}"
        python = {k: v for k, v in python.items() if k not in TIMINGS}
        go = {k: v for k, v in go.items() if k not in TIMINGS}
        assert go.keys() == python.keys(), f"{where}: {go.keys()} != {python.keys()}"
        for key in python:
            assert_same(go[key], python[key], f"{where}.{key}")
    elif isinstance(python, list):
        assert isinstance(go, list), f"{where}: {go}"
        assert len(go) == len(python), f"{where}: {go} != {python}"
        for i, (g, p) in enumerate(zip(go, python, strict=True)):
            assert_same(g, p, f"{where}[{i}]")
    elif isinstance(python, float):
        assert isinstance(go, int | float), f"{where}: {go}"
        assert math.isclose(go, python, rel_tol=1e-6, abs_tol=1e-7), f"{where}: {go} != {python}"
    else:
        assert go == python, f"{where}: {go!r} != {python!r}"


def test_go_client_against_a_live_sidecar(
    go_caller: Path, minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    models = [f"minilm={minilm_dir}", f"triage={classifier_dir}", f"gpt2={gpt2_dir}"]
    process = start_sidecar(
        tmp_path / "serve.log",
        *(arg for model in models for arg in ("--model", model)),
        *("--default-model", "minilm", "--address", address, "--metrics-address="),
    )
    try:
        wait_serving(address, process)
        served = python_answers(address, "triage", "gpt2")
        flags = ("-classify-model", "triage", "-generate-model", "gpt2", "-prompt", PROMPT)
        assert_same(go_answers(go_caller, address, *flags), served, "served")
        # No model flags: Classify and Generate go to the default, an embedding model, and
        # are refused (the stream on its first Recv).
        refused = python_answers(address, "", "")
        assert_same(go_answers(go_caller, address), refused, "refused")
        # The summary users see, for the same calls.
        summary = subprocess.run(
            [go_caller],
            env={**os.environ, "TRANSFORMERS_SIDECAR_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)

    assert served["Generate"]["finishReason"] == "FINISH_REASON_LENGTH"
    embedded = refused["Embed"]
    dimensions = embedded["dimensions"]
    expected = [
        f"embedding: {dimensions} floats, {e['tokenCount']} tokens, truncated: false"
        for e in embedded["embeddings"]
    ]
    expected.append(f"dimensions {dimensions} from minilm on cpu, N µs")
    for call in ("Classify", "Generate"):
        answer = refused[call]
        assert answer["code"] == "FailedPrecondition"
        expected.append(f"{call} failed: {answer['code']}: {answer['message']}")
    assert summary.returncode == 1, summary.stdout + summary.stderr
    assert re.sub(r"\d+ µs", "N µs", summary.stdout).splitlines() == expected, summary.stdout
