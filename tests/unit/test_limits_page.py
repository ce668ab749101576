"""docs/limits.md, the one page of limits and failures, names every setting and bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from export.compare import DEFAULT_ATOL, DEFAULT_RTOL, VALIDATED_TOKENS
from sidecar.config import Settings
from sidecar.generation import formats
from sidecar.generation.sampling import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from sidecar.runtime.onnx_decoder import PREFILL_CHUNK
from sidecar.serving.generative import WARM_UP_MAX_TOKENS
from sidecar.tasks.checks import MAX_CANDIDATE_LABELS
from sidecar.tasks.pairs import MAX_TEMPLATE_CHARS

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "limits.md").read_text()


@pytest.mark.parametrize("setting", [f.name for f in dataclasses.fields(Settings)])
def test_every_setting_is_on_the_page(setting: str) -> None:
    assert f"`{setting}`" in PAGE


@pytest.mark.parametrize(
    "setting",
    [f for f in dataclasses.fields(Settings) if isinstance(f.default, (int, float))],
    ids=lambda f: f.name,
)
def test_numeric_defaults_are_the_servers(setting: dataclasses.Field[object]) -> None:
    row = next(line for line in PAGE.splitlines() if line.startswith(f"| `{setting.name}`"))
    default = setting.default
    shown = str(int(default)) if isinstance(default, float) and default.is_integer() else default
    assert f"`{str(shown).lower()}`" in row, row


def test_request_bounds_are_the_servers() -> None:
    assert f"at most {MAX_STOP_SEQUENCES}, each 1 to {MAX_STOP_CHARS} characters" in PAGE
    assert f"1 to {MAX_CANDIDATE_LABELS}, distinct" in PAGE
    assert f"at most {MAX_TEMPLATE_CHARS} characters" in PAGE
    assert (
        f"at most {formats.MAX_SCHEMA_BYTES} bytes, nested at most {formats.MAX_SCHEMA_DEPTH} "
        "levels" in PAGE
    )
    assert f"at most {formats.MAX_REGEX_CHARS} characters, Rust regex syntax" in PAGE
    assert f"| `response_format.lark_grammar` | at most {formats.MAX_GRAMMAR_BYTES} bytes" in PAGE
    assert (
        f"1 to {formats.MAX_CHOICES} values, each 1 to {formats.MAX_CHOICE_CHARS} characters"
        in PAGE
    )


def test_export_bounds_are_the_exporters() -> None:
    row = next(line for line in PAGE.splitlines() if line.startswith("| `--atol`"))
    assert f"`{DEFAULT_ATOL}`, `{DEFAULT_RTOL}`" in row
    assert f"| `--validate-tokens` | `{VALIDATED_TOKENS}` |" in PAGE
    assert f"at most `{PREFILL_CHUNK}` tokens per forward pass" in PAGE
    assert f"prompt of at most `{WARM_UP_MAX_TOKENS}` tokens" in PAGE
