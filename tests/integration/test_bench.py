"""`make bench --quick` as a smoke check: every scenario runs end to end; speed is not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = [
    *(f"sidecar {n} callers" for n in (1, 4, 16, 64)),
    "sidecar 32 per call",
    "sidecar Stream",
    *(f"naive {n} callers" for n in (1, 4, 16, 64)),
    "sidecar int8 16 callers",
]


@pytest.mark.slow
def test_quick_bench_runs_every_scenario(
    minilm_dir: Path, minilm_int8_dir: Path, minilm_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)]
    command += ["--model-dir", str(minilm_dir), "--int8-dir", str(minilm_int8_dir)]
    command += ["--checkpoint", str(minilm_source)]
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
    assert len(results["ratios"]) == 8
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (out / "bench.md").read_text()
    assert all(f"| {name} |" in tables for name in SCENARIOS)
    # The printed report carries the table and every ratio with its target.
    assert "sidecar 16 callers / ceiling" in done.stdout
    assert "target" in done.stdout
