"""`make bench --quick` as a smoke check: every scenario runs end to end; speed is not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The quick run's only peer is the naive recipe (from the project's venv).
PEERS = ["naive"]


def _paired(prefix: str) -> list[str]:
    """The rows of one corpus's paired rounds: the sidecar's, then each peer's, by callers."""
    return [f"{prefix}{who} {n} callers" for who in ("sidecar", *PEERS) for n in (1, 16)]


def _corpus_ratios(corpus: str) -> list[str]:
    where = f"{corpus} corpus"
    names = [
        f"sidecar 16 callers / ceiling, {where} (paired medians)",
        f"sidecar 16 callers p95 / queueing bound, {where} (paired medians)",
        f"single-call overhead, {where}, ms (sidecar 1 caller p50 - in-process p50)",
    ]
    for peer in PEERS:
        names += [
            f"sidecar / {peer}, 16 callers, {where} (throughput)",
            f"sidecar / {peer}, 1 caller, {where} (throughput)",
            f"sidecar / {peer}, 16 callers, {where} (p95)",
            f"sidecar / {peer}, 1 caller, {where} (p95)",
        ]
    return names


REPEAT_SCENARIOS = [f"repeats 30%: cache {kind}, 16 callers" for kind in ("off", "on")]
long_rows = _paired("")
SCENARIOS = [
    long_rows[0],
    "sidecar 4 callers",
    long_rows[1],
    "sidecar 64 callers",
    "sidecar 32 per call",
    "sidecar Stream",
    "sidecar HTTP 16 callers",
    *long_rows[2:],
    "sidecar int8 16 callers",
    *REPEAT_SCENARIOS,
    *_paired("short: "),
]
EMBEDDING_RATIOS = [
    *_corpus_ratios("long"),
    *_corpus_ratios("short"),
    "HTTP / gRPC, 16 callers (throughput, paired medians)",
    "HTTP / gRPC, 16 callers (p95, paired medians)",
    "batching gain: 16 callers / 1 caller",
    "int8 / fp32, sidecar 16 callers (paired medians)",
    "int8 / fp32, in-process ceiling (throughput)",
    "tracing on / off, 16 callers (paired medians)",
    "int8 cosine to fp32, min over the corpus",
    "repeats 30%: cache on / off, 16 callers (throughput)",
]
GENERATION_RATIOS = [
    "generate TTFT - in-process prefill, ms",
    "generate median ITL / in-process decode step",
    "generate p99 ITL / in-process step p99",
    "decode batching gain: 4 generations, batch 8 / batch 1",
    "generate TTFT - in-process prefill, ms (SmolLM2)",
    "generate median ITL / in-process decode step (SmolLM2)",
    "median ITL / in-process step, 2,048-token context (SmolLM2)",
    "4 generations' ITL / in-process 4-row step, 2,048 tokens (SmolLM2)",
    "tokens/s, 4 generations / 1 (SmolLM2)",
    "tokens/s, 8 generations / 1 (SmolLM2)",
    "Stream / Generate tokens/s, 4 generations (SmolLM2)",
    "Stream / Generate tokens/s, 8 generations (SmolLM2)",
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
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "bench.json").read_text())
    scenarios, embedding = SCENARIOS, EMBEDDING_RATIOS
    rows = {row["name"]: row for row in results["scenarios"]}
    assert list(rows) == scenarios
    for name, row in rows.items():
        assert row["texts_per_s"] > 0, name
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], name
        assert not row["errors"], (name, row["errors"])
    for corpus, measured in results["corpora"].items():
        assert measured["ceiling"]["texts_per_s"] > 0, corpus
        # Every target passed the check against sentence-transformers before it was timed.
        assert set(measured["gate"]) == {"sidecar", *PEERS}, corpus
        assert all(g["cosine_min"] >= 0.999 for g in measured["gate"].values()), corpus
    assert set(results["idle_cpu"]) == {"sidecar", *PEERS}
    assert 0.9 < results["int8"]["cosine_mean"] <= 1.0
    # Generation and structured ratios follow the embedding ones, whatever their counts.
    names = [r["name"] for r in results["ratios"]]
    generation_end = len(embedding) + len(GENERATION_RATIOS)
    assert names[: len(embedding)] == embedding
    assert names[len(embedding) : generation_end] == GENERATION_RATIOS
    assert names[generation_end:] == STRUCTURED_RATIOS
    assert "tracing on / off, 16 callers (paired medians)" in done.stdout
    assert "HTTP / gRPC, 16 callers (throughput, paired medians)" in done.stdout
    (turn,) = results["tracing"]
    assert turn["on"] > 0
    assert turn["off"] > 0
    (repeat,) = results["repeats"]["paired"]
    assert repeat["hits"] > 0
    assert set(results["elapsed_s"]) >= {"total", "generation", "int8", "tracing"}
    _check_generation(results["generation"])
    _check_structured(results["structured"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (out / "bench.md").read_text()
    assert all(f"| {name} |" in tables for name in scenarios)
    # The printed report carries the table and every ratio with its target.
    assert "sidecar 16 callers / ceiling" in done.stdout
    assert "target" in done.stdout
    assert all(name in done.stdout for name in embedding + GENERATION_RATIOS + STRUCTURED_RATIOS)
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
    _check_smollm2(gen["smollm2"])


def _check_smollm2(real: dict[str, Any]) -> None:
    """SmolLM2's quick run: the 128-token context against the in-process loop, then 1, 4 and
    8 generations over Generate and over Stream, every generation to its length."""
    assert real["model"]["vocab"] == 49152
    (row,) = real["sweep"]  # --quick sweeps the first context only
    assert row["context"] == 128
    assert row["inprocess"]["context"] == 128
    for key in ("prefill_ms", "step_p50_ms", "rows_step_p50_ms"):
        assert row["inprocess"][key] > 0, key
    for callers in (1, real["sweep_rows"]):
        measured = row[f"sidecar {callers}"]
        assert not measured["errors"], (callers, measured["errors"])
        assert measured["generations"] == callers
        assert measured["itl_p50_ms"] > 0, callers
    (turn,) = real["concurrency"]
    assert set(turn) == {
        f"{n} generations, {how}" for n in (1, 4, 8) for how in ("Generate", "Stream")
    }
    for label, measured in turn.items():
        assert not measured["errors"], (label, measured["errors"])
        assert measured["generations"] > 0, label
        assert measured["tokens_per_s"] > 0, label
        assert measured["itl_p50_ms"] <= measured["itl_p99_ms"], label
    assert real["elapsed_s"] > 0


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


def test_repeat_corpus_repeats_the_share_asked_each_after_its_first_call() -> None:
    from tools.bench import corpus

    texts = corpus.build_words(700, seed=3)
    assert all(4 <= len(t.split()) <= 64 for t in texts)
    mixed = corpus.with_repeats(texts, 0.3, seed=3)
    assert len(mixed) == 1000
    assert 1 - len(set(mixed)) / len(mixed) == pytest.approx(0.3, abs=0.002)
    # Fresh texts come in corpus order; every repeat follows its text's first call.
    assert list(dict.fromkeys(mixed)) == list(dict.fromkeys(texts))


def test_each_peer_api_is_asked_and_read_in_its_own_shape() -> None:
    from tools.bench.load import http_api

    triton = http_api("triton://127.0.0.1:8000/minilm", "")
    assert triton.url == "http://127.0.0.1:8000/v2/models/minilm/infer"
    (tensor,) = triton.body(["a", "b"])["inputs"]
    assert tensor == {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]}
    reply = {"outputs": [{"name": "embedding", "shape": [2, 2], "data": [1, 2, 3, 4]}]}
    assert triton.vectors(reply) == [[1, 2], [3, 4]]
    infinity = http_api("infinity://127.0.0.1:7997", "m")
    assert infinity.url == "http://127.0.0.1:7997/embeddings"
    assert infinity.body(["a"]) == {"input": ["a"], "model": "m"}
    assert infinity.vectors({"data": [{"embedding": [0.5]}]}) == [[0.5]]
    naive = http_api("http://127.0.0.1:9000", "")
    assert (naive.url, naive.body(["a"])) == ("http://127.0.0.1:9000/embed", {"inputs": ["a"]})
    assert http_api("openai://127.0.0.1:1", "").url == "http://127.0.0.1:1/v1/embeddings"


def test_peers_flag_picks_in_the_bench_order() -> None:
    from tools.bench.__main__ import _peer_list

    assert _peer_list(None, quick=True) == ["naive"]
    assert _peer_list(None, quick=False) == [
        "infinity-optimum",
        "infinity-torch",
        "triton",
        "naive",
    ]
    assert _peer_list("naive, triton", quick=True) == ["triton", "naive"]
    assert _peer_list("none", quick=False) == []
    with pytest.raises(SystemExit, match="unknown peers"):
        _peer_list("tei", quick=False)


def test_gate_sample_holds_the_longest_texts(minilm_dir: Path) -> None:
    from tools.bench import gate

    texts = [" ".join(["word"] * n) for n in range(1, 41)]
    picked = gate.sample(texts, minilm_dir / "tokenizer.json", longest=3, others=4)
    assert picked[:3] == [texts[39], texts[38], texts[37]]
    assert len(picked) == 7
