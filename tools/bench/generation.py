"""Generation: the sidecar's Generate stream against an in-process decode loop, same ONNX model.

    python -m tools.bench.generation build --tokenizer T --out DIR [--quick]
    python -m tools.bench.generation client --target HOST:PORT --prompts P.json ...

Figures follow vLLM's benchmark_serving: TTFT is request sent to first token received;
each inter-token latency (ITL) is the gap between two consecutive messages that carry a
token, every gap of every generation pooled; TPOT is one generation's (e2e - TTFT) /
(output tokens - 1). The in-process reference drives OnnxCausalDecoder itself (tokenize,
prefill, greedy argmax, one step per token): its prefill (text to first token) is what TTFT
is held against, its decode step what ITL is held against.

No generative model can be downloaded here, so the bench builds a random GPT-2 of
distilgpt2's shape (a smaller one for --quick) with the MiniLM WordPiece tokenizer as its
vocabulary, once, and exports it with the sidecar's exporter. Random weights would stop at a
random end-of-sequence token: the checkpoint names none, so every generation runs exactly
max_new_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (model dir, device, extra `sidecar serve` flags) -> a running server's address.
Server = Callable[[Path, str, list[str]], AbstractContextManager[str]]
PROMPT_TOKENS = 64
NEW_TOKENS = 64


@dataclass(frozen=True)
class Shape:
    """A GPT-2's size."""

    layers: int
    width: int
    heads: int
    positions: int


# distilgpt2: per-step cost of a small real model. --quick only needs a real export to run.
FULL = Shape(layers=6, width=768, heads=12, positions=1024)
QUICK = Shape(layers=2, width=128, heads=2, positions=256)


# ---------------------------------------------------------------- the bench model


def build_checkpoint(tokenizer_file: Path, out: Path, shape: Shape, seed: int = 0) -> Path:
    """A random GPT2LMHeadModel whose vocabulary is `tokenizer_file`'s, with no EOS token."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_file))
    # The embedding model's tokenizer pads and cuts to 128: a prompt must reach the model whole.
    raw.no_truncation()
    raw.no_padding()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        model_max_length=shape.positions,
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    tokenizer.save_pretrained(out)
    pad = raw.token_to_id("[PAD]")
    config = GPT2Config(
        vocab_size=raw.get_vocab_size(),
        n_positions=shape.positions,
        n_embd=shape.width,
        n_layer=shape.layers,
        n_head=shape.heads,
        # GPT-2's defaults name token 50256, which this vocabulary has not; no BOS/EOS at all.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(out, safe_serialization=True)
    # Written after the model, which saves a generation config of its own from `config`.
    GenerationConfig(
        bos_token_id=None, eos_token_id=None, pad_token_id=pad, max_new_tokens=NEW_TOKENS
    ).save_pretrained(out)
    return out


def build(tokenizer_file: Path, out: Path, shape: Shape) -> None:
    """Build the checkpoint in a temp dir and export it (ONNX) into `out`."""
    from export.pipeline import export_model
    from sidecar.models.manifest import Task

    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as scratch:
        source = build_checkpoint(tokenizer_file, Path(scratch) / "gpt2", shape)
        export_model(
            str(source),
            out,
            task=Task.GENERATE,
            name=out.name,
            backend="onnx",
            force=True,
        )


def ensure_model(tokenizer_file: Path, out: Path, *, quick: bool) -> Path:
    """The bench GPT-2's model dir, built and exported once (in its own process) and reused."""
    if not (out / "manifest.json").is_file():
        shape = QUICK if quick else FULL
        print(
            f"building a random GPT-2 ({shape.layers} layers, {shape.width} wide) into {out} ...",
            flush=True,
        )
        command = [sys.executable, "-m", "tools.bench.generation", "build"]
        command += ["--tokenizer", str(tokenizer_file), "--out", str(out)]
        # torch stays out of the bench process, whose in-process loop must run as a server's.
        subprocess.run([*command, *(["--quick"] if quick else [])], check=True)
    return out


# ---------------------------------------------------------------- the in-process reference


def prompts(model_dir: Path, count: int, seed: int) -> list[str]:
    """`count` corpus texts of exactly PROMPT_TOKENS tokens (special tokens included)."""
    from tools.bench import corpus

    return corpus.build(model_dir / "tokenizer.json", count, seed, PROMPT_TOKENS, PROMPT_TOKENS)


class Reference:
    """The decode loop a program would write around the same ONNX model, no server."""

    def __init__(self, model_dir: Path, device: str) -> None:
        from tokenizers import Tokenizer

        from sidecar.models.manifest import read_manifest
        from sidecar.runtime.onnx_decoder import OnnxCausalDecoder

        manifest = read_manifest(model_dir)
        # intra_op_threads 0, the server's default: both use every core for each operator.
        self.decoder = OnnxCausalDecoder(model_dir / manifest.onnx_file, device, 0)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def generate(self, text: str, new_tokens: int) -> tuple[float, list[float]]:
        """Greedy decoding of one prompt: (text-to-first-token seconds, each step's seconds).

        The first figure covers tokenizing, prefill and choosing the token, as TTFT does;
        each step covers one decoder step and the argmax of its logits.
        """
        import numpy as np

        began = time.perf_counter()
        # add_special_tokens as the server's plain prompts: the same 64 ids reach the model.
        ids = self.tokenizer.encode(text).ids
        logits, cache = self.decoder.prefill(ids)
        token = int(np.argmax(logits))
        first = time.perf_counter() - began
        steps: list[float] = []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            rows, (cache,) = self.decoder.step([cache], [token])
            token = int(np.argmax(rows[0]))
            steps.append(time.perf_counter() - start)
        return first, steps

    def measure(
        self, texts: list[str], seconds: float, new_tokens: int, least: int = 2
    ) -> dict[str, Any]:
        """Whole generations, one after another, for `seconds` (at least `least` of them)."""
        prefills: list[float] = []
        steps: list[float] = []
        began = time.perf_counter()
        while len(prefills) < least or time.perf_counter() - began < seconds:
            first, each = self.generate(texts[len(prefills) % len(texts)], new_tokens)
            prefills.append(first)
            steps += each
        elapsed = time.perf_counter() - began
        return {
            "generations": len(prefills),
            "prefill_p50_ms": percentile_ms(prefills, 0.5),
            "prefill_p99_ms": percentile_ms(prefills, 0.99),
            "step_p50_ms": percentile_ms(steps, 0.5),
            "step_p99_ms": percentile_ms(steps, 0.99),
            "tokens_per_s": len(prefills) * new_tokens / elapsed,
        }


def percentile_ms(values: list[float], q: float) -> float:
    """Nearest-rank percentile of seconds, in ms (as report.summarize takes them)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


# ---------------------------------------------------------------- the client


@dataclass
class Window:
    """What the callers saw: finished generations that began in the window, token arrivals."""

    start: float
    end: float
    min_calls: int
    records: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    last: float = 0.0

    def open(self, now: float) -> bool:
        """The window runs to `end`, or on until `min_calls` generations have finished."""
        return now < self.end or len(self.records) < self.min_calls

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1


async def _caller(
    stub: Any, request_for: Any, window: Window, offset: int, *, cut: bool, new_tokens: int
) -> None:
    """Generate calls back to back until the window closes."""
    import grpc

    number = offset
    while window.open(began := time.perf_counter()):
        call = stub.Generate(request_for(number), timeout=600)
        number += 1
        stamps: list[float] = []
        tokens, finish = 0, 0
        try:
            async for reply in call:
                now = time.perf_counter()
                if reply.token_ids:
                    stamps.append(now)
                    tokens += len(reply.token_ids)
                    window.arrivals.append((now, len(reply.token_ids)))
                finish = reply.finish_reason or finish
                if cut and not window.open(now):
                    # Throughput runs stop at the window's end rather than wait for the rest.
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as exc:
            window.error(exc.code().name)
            continue
        if not finish:
            # Cut short above: its first token and gaps still count, its e2e and TPOT do not.
            if stamps:
                window.records.append(
                    {
                        "ttft": stamps[0] - began,
                        "itl": [b - a for a, b in itertools.pairwise(stamps)],
                        "partial": True,
                    }
                )
            continue
        if tokens != new_tokens:
            # The bench model has no EOS: anything shorter means the server stopped early.
            window.error(f"{tokens} tokens, not {new_tokens}")
            continue
        if window.open(stamps[-1]):
            window.last = max(window.last, stamps[-1])
        window.records.append(
            {
                "ttft": stamps[0] - began,
                "itl": [b - a for a, b in itertools.pairwise(stamps)],
                "e2e": stamps[-1] - began,
                "tokens": tokens,
            }
        )


async def client(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """`args.callers` callers on one channel; the window opens once each has warmed up."""
    import grpc

    from sidecar.v1 import inference_pb2 as pb
    from sidecar.v1 import inference_pb2_grpc

    def request_for(number: int, tokens: int = args.max_new_tokens) -> Any:
        # temperature 0: greedy, as the in-process loop's argmax.
        text = texts[number % len(texts)]
        return pb.GenerateRequest(
            model=args.model, prompt=text, max_new_tokens=tokens, temperature=0.0
        )

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # One short generation per caller first: the connection and the server's first-call
        # costs stay out of the figures.
        await asyncio.gather(
            *(_drain(stub.Generate(request_for(i, 2), timeout=600)) for i in range(args.callers))
        )
        start = time.perf_counter()
        window = Window(start, start + args.duration, args.min_calls, last=start + args.duration)
        # Callers start at different prompts, as independent clients would.
        await asyncio.gather(
            *(
                _caller(
                    stub, request_for, window, i * 7, cut=args.cut, new_tokens=args.max_new_tokens
                )
                for i in range(args.callers)
            )
        )
    tokens = sum(n for at, n in window.arrivals if start <= at <= window.last)
    return {
        "records": window.records,
        "tokens": tokens,
        "seconds": window.last - start,
        "errors": window.errors,
    }


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """vLLM's figures from one client run; ms, pooled over its finished generations."""
    records = raw["records"]
    itl = [gap for r in records for gap in r["itl"]]
    whole = [r for r in records if not r.get("partial")]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in whole if r["tokens"] > 1]
    return {
        "generations": len(whole),
        "ttft_p50_ms": percentile_ms([r["ttft"] for r in records], 0.5),
        "ttft_p99_ms": percentile_ms([r["ttft"] for r in records], 0.99),
        "itl_p50_ms": percentile_ms(itl, 0.5),
        "itl_p99_ms": percentile_ms(itl, 0.99),
        "tpot_p50_ms": percentile_ms(tpot, 0.5),
        "e2e_p50_ms": percentile_ms([r["e2e"] for r in whole], 0.5),
        "tokens_per_s": raw["tokens"] / raw["seconds"],
        "errors": raw["errors"],
    }


# ---------------------------------------------------------------- the whole part


def run_client(
    address: str, prompts_file: Path, callers: int, args: argparse.Namespace, *, cut: bool
) -> dict[str, Any]:
    """The client in its own process, so it takes no CPU from this one's event loop."""
    command = [sys.executable, "-m", "tools.bench.generation", "client", "--target", address]
    command += ["--prompts", str(prompts_file), "--callers", str(callers)]
    command += ["--duration", str(args.gen_window), "--max-new-tokens", str(NEW_TOKENS)]
    # A smoke run's window is short: keep it open until each caller has finished one.
    command += ["--min-calls", str(callers if args.quick else 0)]
    if cut:
        command.append("--cut")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return summarize(json.loads(done.stdout))


def _echo(name: str, row: dict[str, Any]) -> None:
    print(
        f"  {name:<26} TTFT p50 {row['ttft_p50_ms']:8.2f} ms  ITL p50 {row['itl_p50_ms']:7.2f}"
        f" p99 {row['itl_p99_ms']:7.2f} ms  {row['tokens_per_s']:7.1f} tokens/s",
        flush=True,
    )


def run(args: argparse.Namespace, model_dir: Path, sidecar: Server) -> dict[str, Any]:
    """Paired rounds of in-process vs 1 caller, then interleaved rounds of batch 8 vs 1.

    `sidecar` is __main__'s `sidecar serve` context manager, passed in so that this module
    need not import __main__.
    """
    import gc

    from sidecar.models.manifest import read_manifest

    texts = prompts(model_dir, 16, args.seed)
    prompts_file = Path(tempfile.mkdtemp(prefix="bench-gen-")) / "prompts.json"
    prompts_file.write_text(json.dumps(texts))
    config = json.loads((model_dir / "config.json").read_text())
    result: dict[str, Any] = {
        "model": {
            "dir": str(model_dir),
            "layers": config["n_layer"],
            "width": config["n_embd"],
            "vocab": config["vocab_size"],
            "name": read_manifest(model_dir).name,
        },
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "window_s": args.gen_window,
        "rounds": args.gen_rounds,
    }
    reference = Reference(model_dir, args.device)
    reference.measure(texts, 0.0, NEW_TOKENS, least=1)  # warm-up: first runs allocate
    batch = ["--max-decode-batch-size"]
    with (
        sidecar(model_dir, args.device, [*args.server_args, *batch, "8"]) as batched,
        sidecar(model_dir, args.device, [*args.server_args, *batch, "1"]) as single,
    ):
        # The machine drifts (other processes swing a step's time 2-3x within seconds): each
        # round runs the in-process loop and then one caller back to back, and the ratios are
        # medians of the rounds' own ratios.
        rounds = []
        for round_ in range(args.gen_rounds):
            inproc = reference.measure(texts, args.gen_window, NEW_TOKENS)
            print(
                f"  in-process #{round_ + 1:<13} prefill p50 {inproc['prefill_p50_ms']:8.2f} ms"
                f"  step p50 {inproc['step_p50_ms']:7.2f} p99 {inproc['step_p99_ms']:7.2f} ms"
                f"  {inproc['tokens_per_s']:7.1f} tokens/s",
                flush=True,
            )
            row = run_client(batched, prompts_file, 1, args, cut=False)
            _echo(f"sidecar 1 caller #{round_ + 1}", row)
            rounds.append({"inprocess": inproc, "sidecar": row})
        result["paired"] = rounds
        del reference
        gc.collect()
        # Both servers stay up and take turns, the order swapped every round, so neither
        # setting always runs first after the other's load.
        turns = []
        for round_ in range(args.gen_rounds):
            order = [("batch 8", batched), ("batch 1", single)]
            turn: dict[str, Any] = {}
            for label, address in order if round_ % 2 == 0 else order[::-1]:
                turn[label] = run_client(address, prompts_file, 4, args, cut=True)
                _echo(f"4 callers, {label} #{round_ + 1}", turn[label])
            turns.append(turn)
        result["batching"] = turns
    return result


def ratios(gen: dict[str, Any], ratio: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """The generation targets, each a median over the paired (or interleaved) rounds."""
    pairs, turns = gen["paired"], gen["batching"]
    overhead = statistics.median(
        p["sidecar"]["ttft_p50_ms"] - p["inprocess"]["prefill_p50_ms"] for p in pairs
    )
    itl = statistics.median(
        p["sidecar"]["itl_p50_ms"] / p["inprocess"]["step_p50_ms"] for p in pairs
    )
    itl99 = statistics.median(
        p["sidecar"]["itl_p99_ms"] / p["inprocess"]["step_p99_ms"] for p in pairs
    )
    gain = statistics.median(
        t["batch 8"]["tokens_per_s"] / t["batch 1"]["tokens_per_s"] for t in turns
    )
    return [
        ratio("generate TTFT - in-process prefill, ms", overhead, "<= 2 ms", met=overhead <= 2.0),
        ratio("generate median ITL / in-process decode step", itl, "<= 1.1", met=itl <= 1.1),
        ratio("generate p99 ITL / in-process step p99", itl99, "report", met=True),
        ratio("decode batching gain: 4 generations, batch 8 / batch 1", gain, "report", met=True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build and export the bench GPT-2")
    build_cmd.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer.json")
    build_cmd.add_argument("--out", type=Path, required=True)
    build_cmd.add_argument("--quick", action="store_true", help="the small model")
    client_cmd = commands.add_parser("client", help="Generate callers; JSON on stdout")
    client_cmd.add_argument("--target", required=True, help="host:port")
    client_cmd.add_argument("--model", default="")
    client_cmd.add_argument("--prompts", type=Path, required=True, help="JSON list of texts")
    client_cmd.add_argument("--callers", type=int, default=1)
    client_cmd.add_argument("--duration", type=float, default=8.0)
    client_cmd.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS)
    client_cmd.add_argument(
        "--min-calls", type=int, default=0, help="keep the window open until this many finish"
    )
    client_cmd.add_argument(
        "--cut", action="store_true", help="cancel generations in flight when the window ends"
    )
    args = parser.parse_args()
    if args.command == "build":
        build(args.tokenizer, args.out, QUICK if args.quick else FULL)
        return
    texts = json.loads(args.prompts.read_text())
    print(json.dumps(asyncio.run(client(args, texts))))


if __name__ == "__main__":
    main()
