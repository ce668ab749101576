"""Summaries, the ratio table, the JSON file and the chart of one bench run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def summarize(raw: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of one load run."""
    latencies = sorted(raw["latencies"])

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        # Nearest rank: the smallest latency with at least q of the calls at or below it.
        return 1000 * latencies[max(math.ceil(q * len(latencies)) - 1, 0)]

    return {
        **labels,
        "texts_per_s": raw["texts"] / raw["seconds"],
        "calls": raw["calls"],
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "errors": raw["errors"],
    }


def median_ms(latencies: list[float]) -> float:
    """Median of latencies given in seconds, in ms."""
    return 1000 * statistics.median(latencies)


def table(rows: list[dict[str, Any]]) -> str:
    """The scenarios as a fixed-width text table."""
    head = f"{'scenario':<22}{'callers':>8}{'texts/call':>11}{'texts/s':>10}"
    head += f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  errors"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['name']:<22}{row['callers']:>8}{row['per_call']:>11}{row['texts_per_s']:>10.1f}"
            f"{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}{row['p99_ms']:>9.2f}  "
            f"{sum(row['errors'].values()) or ''}"
        )
    return "\n".join(lines)


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    """Each ratio with its target and whether this run met it."""
    lines = []
    for r in ratios:
        verdict = "met" if r["met"] else "MISSED"
        lines.append(f"{r['name']:<56}{r['value']:>9.3f}  target {r['target']:<10} {verdict}")
    return "\n".join(lines)


def _generation_rows(gen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(scenario, figures) of every generation run, in the order they ran.

    In-process rows carry prefill and decode step where sidecar rows carry TTFT and ITL:
    the figures each is held against.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    for i, pair in enumerate(gen["paired"]):
        inproc = pair["inprocess"]
        rows.append(
            (
                f"in-process loop #{i + 1}",
                {
                    "first_p50": inproc["prefill_p50_ms"],
                    "first_p99": inproc["prefill_p99_ms"],
                    "gap_p50": inproc["step_p50_ms"],
                    "gap_p99": inproc["step_p99_ms"],
                    "tpot_p50": inproc["step_p50_ms"],
                    "tokens_per_s": inproc["tokens_per_s"],
                    "errors": {},
                },
            )
        )
        rows.append((f"sidecar 1 caller #{i + 1}", _sidecar_figures(pair["sidecar"])))
    for i, turn in enumerate(gen["batching"]):
        for label, row in turn.items():
            rows.append((f"4 callers, {label} #{i + 1}", _sidecar_figures(row)))
    return rows


def _sidecar_figures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "first_p50": row["ttft_p50_ms"],
        "first_p99": row["ttft_p99_ms"],
        "gap_p50": row["itl_p50_ms"],
        "gap_p99": row["itl_p99_ms"],
        "tpot_p50": row["tpot_p50_ms"],
        "tokens_per_s": row["tokens_per_s"],
        "errors": row["errors"],
    }


def _generation_title(gen: dict[str, Any]) -> str:
    model = gen["model"]
    return (
        f"generation: random GPT-2, {model['layers']} layers x {model['width']}, vocab "
        f"{model['vocab']}; {gen['prompt_tokens']}-token prompts, {gen['new_tokens']} new "
        "tokens, greedy (in-process: TTFT = prefill, ITL = decode step)"
    )


def generation_table(gen: dict[str, Any]) -> str:
    """The generation runs as a fixed-width text table, ms and output tokens/s."""
    head = f"{'scenario':<24}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
    head += f"{'TPOT p50':>10}{'tokens/s':>10}  errors"
    lines = [_generation_title(gen), head, "-" * len(head)]
    for name, f in _generation_rows(gen):
        lines.append(
            f"{name:<24}{f['first_p50']:>10.2f}{f['first_p99']:>10.2f}{f['gap_p50']:>9.2f}"
            f"{f['gap_p99']:>9.2f}{f['tpot_p50']:>10.2f}{f['tokens_per_s']:>10.1f}  "
            f"{sum(f['errors'].values()) or ''}"
        )
    return "\n".join(lines)


def write(out: Path, results: dict[str, Any]) -> None:
    """bench.json, bench.md and bench.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    if "scenarios" in results:  # the chart is of the embedding scenarios
        chart(out / "bench.png", results)


def markdown(results: dict[str, Any]) -> str:
    """The scenario and ratio tables as Markdown, for docs that quote a run."""
    lines = [
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"device {results['device']}",
    ]
    if "scenarios" in results:
        lines += ["", *_embedding_markdown(results)]
    if "generation" in results:
        lines += ["", *_generation_markdown(results["generation"])]
    if "structured" in results:
        lines += ["", *_structured_markdown(results["structured"])]
    lines += ["", "| ratio | measured | target | |", "|---|---|---|---|"]
    for r in results["ratios"]:
        verdict = "" if r["target"] == "report" else ("met" if r["met"] else "missed")
        target = "" if r["target"] == "report" else r["target"]
        lines.append(f"| {r['name']} | {r['value']:.3f} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


def _structured_markdown(result: dict[str, Any]) -> list[str]:
    inproc = result["in_process"]
    lines = [
        f"Structured generation on {result['model']} (vocabulary {inproc['vocab']}): token "
        f"table {inproc['token_table_ms']:.0f} ms once per model; triage schema compile p50 "
        f"{inproc['compile_p50_ms']:.2f} ms; token mask p50 {inproc['mask_p50_ms']:.3f} ms, "
        f"p99 {inproc['mask_p99_ms']:.3f} ms.",
        "",
        "| run | ITL p50 ms | ITL p99 ms | tokens | finishes |",
        "|---|---|---|---|---|",
    ]
    for number, turn in enumerate(result["rounds"], 1):
        for label, row in turn.items():
            finishes = ", ".join(
                f"{k.removeprefix('FINISH_REASON_')} {v}" for k, v in row["finishes"].items()
            )
            lines.append(
                f"| {label} #{number} | {row['itl_p50_ms']:.2f} | {row['itl_p99_ms']:.2f} | "
                f"{row['tokens_mean']:.1f} | {finishes} |"
            )
    return lines


def _generation_markdown(gen: dict[str, Any]) -> list[str]:
    lines = [
        _generation_title(gen),
        "",
        "| generation | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | TPOT p50 ms "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in _generation_rows(gen):
        lines.append(
            f"| {name} | {f['first_p50']:.1f} | {f['first_p99']:.1f} | {f['gap_p50']:.2f} | "
            f"{f['gap_p99']:.2f} | {f['tpot_p50']:.2f} | {f['tokens_per_s']:.1f} |"
        )
    return lines


def _embedding_markdown(results: dict[str, Any]) -> list[str]:
    ceiling = results["ceiling"]
    sizes = " / ".join(f"{v:.1f} (batch {k})" for k, v in ceiling["by_batch_size"].items())
    paired = results.get("paired", [])
    lines = [
        "| scenario | texts/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
        f"| ceiling, in process, length-sorted | {sizes} | | | |",
    ]
    lines += [
        f"| ceiling, paired round {i + 1} | {p['ceiling']:.1f} | | | |"
        for i, p in enumerate(paired)
    ]
    for i, p in enumerate(paired):
        lines.append(
            f"| sidecar 16 callers, paired round {i + 1} | {p['texts_per_s']:.1f} | "
            f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['p99_ms']:.0f} |"
        )
    for row in results["scenarios"]:
        lines.append(
            f"| {row['name']} | {row['texts_per_s']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    for turn in results["int8"].get("paired", []):
        lines.append(
            f"| int8 round: fp32 / int8 sidecar, 16 callers | {turn['fp32']:.1f} / "
            f"{turn['int8']:.1f} | | | |"
        )
    return lines


def chart(path: Path, results: dict[str, Any]) -> None:
    """Throughput of every scenario against the ceiling, and p95 latency by callers."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    rows = results["scenarios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["name"] for r in rows]
    left.barh(names, [r["texts_per_s"] for r in rows], color="#4c72b0")
    left.axvline(results["ceiling"]["texts_per_s"], color="#c44e52", linestyle="--")
    left.text(
        results["ceiling"]["texts_per_s"], len(rows) - 0.5, " in-process ceiling", color="#c44e52"
    )
    left.set_xlabel("texts per second")
    left.invert_yaxis()
    for family, color in (("sidecar", "#4c72b0"), ("naive", "#dd8452")):
        series = [
            r for r in rows if r["family"] == family and r["per_call"] == 1 and not r["stream"]
        ]
        right.plot(
            [r["callers"] for r in series],
            [r["p95_ms"] for r in series],
            "o-",
            color=color,
            label=family,
        )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent callers (one text per call)")
    right.set_ylabel("p95 latency, ms")
    right.legend()
    fig.suptitle(f"all-MiniLM-L6-v2 on {results['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
