"""`make bench --quick` as a smoke check: every scenario runs end to end; speed is not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = [
    *(f"sidecar {n} callers" for n in (1, 4, 16, 64)),
    "sidecar 32 per call",
    "sidecar Stream",
    "sidecar HTTP 16 callers",
    *(f"naive {n} callers" for n in (1, 4, 16, 64)),
    "sidecar int8 16 callers",
]
GENERATION_RATIOS = [
    "generate TTFT - in-process prefill, ms",
    "generate median ITL / in-process decode step",
    "generate p99 ITL / in-process step p99",
    "decode batching gain: 4 generations, batch 8 / batch 1",
]
STRUCTURED_RATIOS = [
    "schema / free median ITL, 1 caller (SmolLM2)",
    "schema / free median ITL, 4 callers (SmolLM2)",
    "triage schema compile p50, ms",
]


@pytest.mark.slow
def test_quick_bench_runs_every_scenario(
    minilm_dir: Path, minilm_int8_dir: Path, minilm_source: Path, smollm2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)]
    command += ["--model-dir", str(minilm_dir), "--int8-dir", str(minilm_int8_dir)]
    command += ["--checkpoint", str(minilm_source), "--structured-dir", str(smollm2_dir)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "bench.json").read_text())
    rows = {row["name"]: row for row in results["scenarios"]}
    assert list(rows) == SCENARIOS
    for name, row in rows.items():
        assert row["texts_per_s"] > 0, name
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], name
        assert not row["errors"], (name, row["errors"])
    assert results["ceiling"]["texts_per_s"] > 0
    assert 0.9 < results["int8"]["cosine_mean"] <= 1.0
    assert len(results["ratios"]) == 18
    assert [r["name"] for r in results["ratios"][11:15]] == GENERATION_RATIOS
    assert [r["name"] for r in results["ratios"][15:]] == STRUCTURED_RATIOS
    assert "tracing on / off, 16 callers (paired medians)" in done.stdout
    assert "HTTP / gRPC, 16 callers (throughput, paired medians)" in done.stdout
    (turn,) = results["tracing"]
    assert turn["on"] > 0
    assert turn["off"] > 0
    _check_generation(results["generation"])
    _check_structured(results["structured"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (out / "bench.md").read_text()
    assert all(f"| {name} |" in tables for name in SCENARIOS)
    # The printed report carries the table and every ratio with its target.
    assert "sidecar 16 callers / ceiling" in done.stdout
    assert "target" in done.stdout
    assert all(name in done.stdout for name in GENERATION_RATIOS + STRUCTURED_RATIOS)
    assert "| sidecar 1 caller #1 |" in tables
    assert "| 4 callers, batch 1 #1 |" in tables


def _check_generation(gen: dict[str, Any]) -> None:
    """Every generation figure was measured, is positive, and no call failed."""
    assert gen["model"]["vocab"] == 30522  # the MiniLM tokenizer's vocabulary
    (pair,) = gen["paired"]
    inproc = pair["inprocess"]
    for key in ("prefill_p50_ms", "step_p50_ms", "step_p99_ms", "tokens_per_s"):
        assert inproc[key] > 0, key
    (turn,) = gen["batching"]
    for name, row in [("1 caller", pair["sidecar"]), *turn.items()]:
        assert not row["errors"], (name, row["errors"])
        assert row["generations"] > 0, name
        for key in ("ttft_p50_ms", "itl_p50_ms", "tpot_p50_ms", "tokens_per_s"):
            assert row[key] > 0, (name, key)
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"], name
        assert row["itl_p50_ms"] <= row["itl_p99_ms"], name


def _check_structured(result: dict[str, Any]) -> None:
    """The schema's costs were measured and every constrained reply completed its schema."""
    inproc = result["in_process"]
    assert inproc["vocab"] == 49152  # SmolLM2's
    for key in ("token_table_ms", "compile_p50_ms", "mask_p50_ms"):
        assert inproc[key] > 0, key
    (turn,) = result["rounds"]
    assert set(turn) == {
        f"{n}, {kind}" for n in ("1 caller", "4 callers") for kind in ("free", "schema")
    }
    for label, row in turn.items():
        assert row["itl_p50_ms"] > 0, label
    assert set(turn["1 caller, schema"]["finishes"]) == {"FINISH_REASON_COMPLETE"}
