"""Summaries, the ratio table, the JSON file and the chart of one bench run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def summarize(raw: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of one load run."""
    latencies: list[float] = sorted(raw["latencies"])

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
    """The scenarios as a fixed-width text table (paired-round rows: medians of the rounds)."""
    width = max([22, *(len(row["name"]) + 2 for row in rows)])
    head = f"{'scenario':<{width}}{'callers':>8}{'texts/call':>11}{'texts/s':>10}"
    head += f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  errors"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['name']:<{width}}{row['callers']:>8}{row['per_call']:>11}"
            f"{row['texts_per_s']:>10.1f}{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}"
            f"{row['p99_ms']:>9.2f}  {sum(row['errors'].values()) or ''}"
        )
    return "\n".join(lines)


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    """Each ratio with its target and whether this run met it."""
    width = max([56, *(len(r["name"]) + 1 for r in ratios)])
    lines = []
    for r in ratios:
        verdict = "met" if r["met"] else "MISSED"
        lines.append(f"{r['name']:<{width}}{r['value']:>9.3f}  target {r['target']:<10} {verdict}")
    return "\n".join(lines)


def elapsed_table(elapsed: dict[str, float]) -> str:
    """How long each part of the run took, in seconds and minutes."""
    width = max([24, *(len(name) + 2 for name in elapsed)])
    return "\n".join(
        f"{name:<{width}}{seconds:>7.0f} s {seconds / 60:>6.1f} min"
        for name, seconds in elapsed.items()
    )


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
    lines += ["", "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in results["elapsed_s"].items()]
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
    if "smollm2" in gen:
        lines += ["", *_smollm2_markdown(gen["smollm2"])]
    return lines


def _smollm2_markdown(real: dict[str, Any]) -> list[str]:
    """SmolLM2's context sweep and its 1 / 4 / 8 generations over Generate and Stream."""
    rows = real["sweep_rows"]

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        f"SmolLM2-135M-Instruct, greedy, EOS held back; context sweep: {real['sweep_tokens']} new "
        f"tokens, the in-process step (1 row, {rows} rows) against the sidecar's median ITL (1 "
        f"generation; {rows} started at once, the steps all {rows} shared)",
        "",
        f"| context | round | prefill ms | TTFT ms | step ms | ITL ms | step x{rows} ms "
        f"| ITL x{rows} ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in real["sweep"]:
        inproc, one, many = row["inprocess"], row["sidecar 1"], row[f"sidecar {rows}"]
        lines.append(
            f"| {row['context']} | {row['round'] + 1} | {inproc['prefill_ms']:.1f} | "
            f"{one['ttft_p50_ms']:.1f} | {inproc['step_p50_ms']:.2f} | {one['itl_p50_ms']:.2f} | "
            f"{inproc['rows_step_p50_ms']:.2f} | {ms(many['itl_together_p50_ms'])} |"
        )
    lines += [
        "",
        f"{real['prompt_tokens']}-token prompts, {real['new_tokens']} new tokens, "
        f"{real['window_s']:.0f} s windows from when every generation has its first token",
        "",
        "| run | TTFT p50 ms | ITL p50 ms | ITL p99 ms | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for i, turn in enumerate(real["concurrency"]):
        for label, r in turn.items():
            lines.append(
                f"| {label} #{i + 1} | {r['ttft_p50_ms']:.1f} | {r['itl_p50_ms']:.2f} | "
                f"{r['itl_p99_ms']:.2f} | {r['tokens_per_s']:.1f} |"
            )
    return lines


def _embedding_markdown(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for label, measured in results["corpora"].items():
        what = measured["corpus"]
        lines.append(
            f"{label} corpus: {what['texts']} texts of {what['lengths']} (uniform); in-process "
            "single-text p50 "
            f"{measured['inprocess_single_p50_ms']:.2f} ms."
        )
    lines += [
        "",
        "| target | corpus | min cosine to sentence-transformers | idle CPU, share of a core |",
        "|---|---|---|---|",
    ]
    for label, measured in results["corpora"].items():
        for name, check in measured["gate"].items():
            idle = results.get("idle_cpu", {}).get(name)
            shown = "" if idle is None else f"{idle:.1%}"
            lines.append(f"| {name} | {label} | {check['cosine_min']:.6f} | {shown} |")
    lines += ["", "| scenario | texts/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    for label, measured in results["corpora"].items():
        ceiling = measured["ceiling"]
        sizes = " / ".join(f"{v:.1f} (batch {k})" for k, v in ceiling["by_batch_size"].items())
        lines.append(f"| ceiling, {label} corpus, in process, length-sorted | {sizes} | | | |")
        lines += [
            f"| ceiling, {label} corpus, paired round {i + 1} | {p['ceiling']:.1f} | | | |"
            for i, p in enumerate(measured["paired"])
        ]
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
    repeats = results.get("repeats") or {}
    for i, turn in enumerate(repeats.get("paired", [])):
        lines.append(
            f"| repeats round {i + 1}: cache off / on, 16 callers (hits / misses "
            f"{turn['hits']:.0f} / {turn['misses']:.0f}) | {turn['off']:.1f} / {turn['on']:.1f} "
            "| | | |"
        )
    lines += [
        "",
        "Paired-round rows are medians over the rounds; each round runs the ceiling, then every "
        "target in turn, in an order rotated each round.",
    ]
    return lines


def _targets(rows: list[dict[str, Any]], corpus: str, callers: int) -> dict[str, dict[str, Any]]:
    """The sidecar's and each peer's one-text-per-call gRPC/HTTP row on a corpus, by family."""
    return {
        r["family"]: r
        for r in rows
        if r.get("corpus") == corpus
        and r["callers"] == callers
        and r["per_call"] == 1
        and not r["stream"]
        and r["family"] != "http"
    }


def chart(path: Path, results: dict[str, Any]) -> None:
    """Throughput of the sidecar and each peer on both corpora against the ceiling, p95 at 16
    callers, and the sidecar's other scenarios."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    rows = results["scenarios"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colors = {16: "#4c72b0", 1: "#dd8452"}
    for ax, label in zip(axes[0], results["corpora"], strict=True):
        at16, at1 = _targets(rows, label, 16), _targets(rows, label, 1)
        names = list(at16)
        for offset, (callers, found) in enumerate(((16, at16), (1, at1))):
            ax.barh(
                [i + 0.4 * offset for i in range(len(names))],
                [found[n]["texts_per_s"] for n in names],
                height=0.4,
                color=colors[callers],
                label=f"{callers} caller{'s' if callers > 1 else ''}",
            )
        ceiling = statistics.median(p["ceiling"] for p in results["corpora"][label]["paired"])
        ax.axvline(ceiling, color="#c44e52", linestyle="--", label="in-process ceiling")
        ax.set_yticks([i + 0.2 for i in range(len(names))], names)
        ax.invert_yaxis()
        ax.set_xlabel("texts per second (one text per call)")
        ax.set_title(f"{label} corpus")
        ax.legend(loc="best", fontsize="small")
    p95 = axes[1][0]
    labels = list(results["corpora"])
    names = list(_targets(rows, labels[0], 16))
    for offset, label in enumerate(labels):
        found = _targets(rows, label, 16)
        p95.barh(
            [i + 0.4 * offset for i in range(len(names))],
            [found[n]["p95_ms"] for n in names],
            height=0.4,
            color=("#4c72b0", "#55a868")[offset],
            label=f"{label} corpus",
        )
    p95.set_yticks([i + 0.2 for i in range(len(names))], names)
    p95.invert_yaxis()
    p95.set_xlabel("p95 latency at 16 callers, ms")
    p95.legend(loc="best", fontsize="small")
    others = [
        r
        for r in rows
        if r["family"] in ("sidecar", "http", "int8", "repeats")
        and r not in _targets(rows, r.get("corpus", ""), r["callers"]).values()
    ]
    side = axes[1][1]
    side.barh([r["name"] for r in others], [r["texts_per_s"] for r in others], color="#8172b2")
    side.invert_yaxis()
    side.set_xlabel("texts per second, long corpus")
    side.set_title("the sidecar's other scenarios")
    fig.suptitle(f"all-MiniLM-L6-v2 on {results['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
