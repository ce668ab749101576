"""The Node.js client (clients/node, @grpc/grpc-js + @grpc/proto-loader on proto/) against a
live `sidecar serve`: its own tests run with `node --test` and must get the answers the
Python client gets from the same server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc
from tests.processes import free_port, start_sidecar, stop_sidecar, wait_serving

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "node"
pytestmark = pytest.mark.slow

TEXTS = ["Refund not received after 14 days", "App crashes on login", "Change my email"]
PROMPT = "The refund"
SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["billing", "login", "bug"]},
        "urgent": {"type": "boolean"},
    },
    "required": ["category", "urgent"],
    "additionalProperties": False,
}


def python_answers(address: str) -> dict[str, object]:
    """What the Python client gets: the Node client must see the same."""
    with grpc.insecure_channel(address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        embedded = inference.Embed(pb.EmbedRequest(model="minilm", inputs=TEXTS), timeout=30)
        classified = inference.Classify(pb.ClassifyRequest(model="triage", inputs=TEXTS))
        (tokens,) = inference.Tokenize(
            pb.TokenizeRequest(model="minilm", inputs=["Café 東京"])
        ).results
        steps = list(
            inference.Generate(
                pb.GenerateRequest(model="gpt2", prompt=PROMPT, max_new_tokens=12), timeout=30
            )
        )
        shaped = pb.ResponseFormat(json_schema=json.dumps(SCHEMA))
        triaged = list(
            inference.Generate(
                pb.GenerateRequest(
                    model="gpt2", prompt=TEXTS[0], response_format=shaped, max_new_tokens=64
                ),
                timeout=30,
            )
        )
    return {
        "texts": TEXTS,
        "embeddings": [list(e.values) for e in embedded.embeddings],
        "classify": [[[s.label, s.score] for s in r.labels] for r in classified.results],
        "tokenize": {
            "ids": list(tokens.ids),
            "tokens": list(tokens.tokens),
            "offsets": [[s.start, s.end] for s in tokens.offsets],
        },
        "prompt": PROMPT,
        "generated": "".join(step.text for step in steps),
        "completion_tokens": steps[-1].usage.completion_tokens,
        "finish_reason": pb.FinishReason.Name(steps[-1].finish_reason),
        "schema": json.dumps(SCHEMA),
        "triaged": "".join(step.text for step in triaged),
    }


def test_node_client_against_a_live_sidecar(
    minilm_dir: Path, classifier_dir: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "Node.js 20+ is needed for the Node client tests"
    assert (CLIENT / "node_modules").exists(), "run `make install` (npm ci in clients/node)"
    address = f"127.0.0.1:{free_port()}"
    models = [f"minilm={minilm_dir}", f"triage={classifier_dir}", f"gpt2={gpt2_dir}"]
    process = start_sidecar(
        tmp_path / "serve.log",
        *(arg for model in models for arg in ("--model", model)),
        *("--address", address, "--metrics-address="),
    )
    try:
        wait_serving(address, process)
        expected = tmp_path / "expected.json"
        expected.write_text(json.dumps(python_answers(address)))
        env = {
            **os.environ,
            "TRANSFORMERS_SIDECAR_ADDRESS": address,
            "SIDECAR_EXPECTED": str(expected),
        }
        done = subprocess.run(
            [node, "--test", "--test-reporter=tap", "test/"],
            cwd=CLIENT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop_sidecar(process, signum=signal.SIGKILL)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    counts = dict(re.findall(r"^# (pass|fail|tests) (\d+)$", done.stdout, re.MULTILINE))
    # Every test ran and passed: a test file that silently loaded nothing would pass too.
    assert counts == {"tests": "9", "pass": "9", "fail": "0"}, report
