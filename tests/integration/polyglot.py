"""What the polyglot caller tests share (test_go_client.py, test_java_client.py): the build
kept under .cache/, a live sidecar serving MiniLM, a classifier and a GPT-2, the calls the
callers make asked of the Python client, the callers' JSON lines read back, and the
comparison of the two (check_caller, the whole test but for each caller's spelling)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "proto/sidecar/v1").glob("*.proto"))
PROMPT = "The refund"
# Timings differ from call to call; everything else in the metadata must match.
TIMINGS = {"queueUs", "tokenizeUs", "inferenceUs", "postprocessUs"}

# How a caller names a status code: its gRPC library's spelling.
CodeName = Callable[[grpc.StatusCode], str]


def go_code(code: grpc.StatusCode) -> str:
    """grpc-go's codes.Code.String(): FailedPrecondition."""
    return "".join(word.capitalize() for word in code.name.split("_"))


def java_code(code: grpc.StatusCode) -> str:
    """grpc-java's Status.Code: FAILED_PRECONDITION, the name Python uses too."""
    return code.name


def cached_build(
    out: Path, inputs: Sequence[Path], toolchain: bytes, build: Path, env: dict[str, str]
) -> Path:
    """`build PARTIAL` once per digest of its inputs: out's stem gets the digest's first 16 hex
    digits (OUT-DIGEST.SUFFIX), and builds of sources since changed are removed."""
    digest = hashlib.sha256(toolchain)
    for path in [build, *inputs]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    built = out.with_name(f"{out.stem}-{digest.hexdigest()[:16]}{out.suffix}")
    if not built.exists():
        built.parent.mkdir(parents=True, exist_ok=True)
        for stale in built.parent.glob(f"{out.stem}-*"):
            stale.unlink()  # built from sources since changed
        partial = built.with_name(built.name + ".partial")
        # A cold build takes under a minute here; past ten it is stuck.
        done = subprocess.run(
            [build, partial], env={**os.environ, **env}, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        partial.rename(built)
    return built


@contextmanager
def serving(
    tmp_path: Path, minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path
) -> Iterator[str]:
    """`sidecar serve` with minilm (the default), triage and gpt2; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    models = [f"minilm={minilm_dir}", f"triage={classifier_dir}", f"gpt2={gpt2_dir}"]
    process = start_sidecar(
        tmp_path / "serve.log",
        *(arg for model in models for arg in ("--model", model)),
        *("--default-model", "minilm", "--address", address, "--metrics-address="),
    )
    try:
        wait_serving(address, process)
        yield address
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)


def as_json(message: Message) -> dict[str, Any]:
    """A reply as the proto's JSON mapping has it, as protojson and JsonFormat write it too."""
    return json_format.MessageToDict(message)


def refusal(call: str, error: grpc.RpcError, code_name: CodeName) -> dict[str, Any]:
    """A refused call as the callers' JSON output prints it, in their library's code name."""
    return {"call": call, "code": code_name(error.code()), "message": error.details()}


def generation(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's text and tokens joined, with the last message's finish, usage and metadata
    (how the server cuts the text into messages is not the caller's to match)."""
    text = "".join(step.get("text", "") for step in steps)
    ids = [token for step in steps for token in step.get("tokenIds", [])]
    return {**steps[-1], "text": text, "tokenIds": ids}


def python_answers(
    address: str, classify_model: str, generate_model: str, code_name: CodeName
) -> dict[str, Any]:
    """What the Python client gets for the calls the callers make (the same requests)."""
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
            answers["Classify"] = refusal("Classify", error, code_name)
        try:
            answers["Generate"] = generation([as_json(s) for s in inference.Generate(generate)])
        except grpc.RpcError as error:
            answers["Generate"] = refusal("Generate", error, code_name)
    return answers


def run_caller(command: Sequence[str | Path], address: str) -> subprocess.CompletedProcess[str]:
    """The caller dialling `address` as the Helm chart tells it to."""
    return subprocess.run(
        command,
        # UTF-8 whatever the machine's locale: the summary prints µs, which Java encodes by it.
        env={**os.environ, "TRANSFORMERS_SIDECAR_ADDRESS": address, "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def caller_answers(command: Sequence[str | Path], address: str) -> dict[str, Any]:
    """The caller's JSON lines by call, Generate's steps joined as for Python."""
    done = run_caller(command, address)
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


def summary_lines(refused: dict[str, Any]) -> list[str]:
    """The summary a caller prints for Python's answers with Classify and Generate refused,
    its µs figure as N."""
    embedded = refused["Embed"]
    dimensions = embedded["dimensions"]
    lines = [
        f"embedding: {dimensions} floats, {e['tokenCount']} tokens, truncated: false"
        for e in embedded["embeddings"]
    ]
    lines.append(f"dimensions {dimensions} from minilm on cpu, N µs")
    for call in ("Classify", "Generate"):
        answer = refused[call]
        lines.append(f"{call} failed: {answer['code']}: {answer['message']}")
    return lines


def assert_same(caller: object, python: object, where: str = "") -> None:
    """Equal, but for timings and floats' last bits (two forward passes may differ there)."""
    if isinstance(python, dict):
        assert isinstance(caller, dict), f"{where}: {caller}"
        python = {k: v for k, v in python.items() if k not in TIMINGS}
        caller = {k: v for k, v in caller.items() if k not in TIMINGS}
        assert caller.keys() == python.keys(), f"{where}: {caller.keys()} != {python.keys()}"
        for key in python:
            assert_same(caller[key], python[key], f"{where}.{key}")
    elif isinstance(python, list):
        assert isinstance(caller, list), f"{where}: {caller}"
        assert len(caller) == len(python), f"{where}: {caller} != {python}"
        for i, (c, p) in enumerate(zip(caller, python, strict=True)):
            assert_same(c, p, f"{where}[{i}]")
    elif isinstance(python, float):
        assert isinstance(caller, int | float), f"{where}: {caller}"
        assert math.isclose(caller, python, rel_tol=1e-6, abs_tol=1e-7), (
            f"{where}: {caller} != {python}"
        )
    else:
        assert caller == python, f"{where}: {caller!r} != {python!r}"


def check_caller(
    caller: Sequence[str | Path],
    json_flag: str,
    model_flags: Sequence[str],
    code_name: CodeName,
    models: tuple[Path, Path, Path],
    tmp_path: Path,
) -> None:
    """The caller against a live sidecar: its JSON lines with `model_flags` (triage, gpt2,
    PROMPT) and without them (Classify and Generate then go to the default, an embedding
    model, and are refused), and its plain summary of the refused calls, each what the
    Python client gets for the same calls. `models`: the MiniLM, classifier and GPT-2 dirs."""
    with serving(tmp_path, *models) as address:
        served = python_answers(address, "triage", "gpt2", code_name)
        assert_same(caller_answers([*caller, json_flag, *model_flags], address), served, "served")
        refused = python_answers(address, "", "", code_name)
        assert_same(caller_answers([*caller, json_flag], address), refused, "refused")
        # The summary users see, for the same calls.
        summary = run_caller(caller, address)

    assert served["Generate"]["finishReason"] == "FINISH_REASON_LENGTH"
    for call in ("Classify", "Generate"):
        assert refused[call]["code"] == code_name(grpc.StatusCode.FAILED_PRECONDITION)
    assert summary.returncode == 1, summary.stdout + summary.stderr
    lines = re.sub(r"\d+ µs", "N µs", summary.stdout).splitlines()
    assert lines == summary_lines(refused), summary.stdout
