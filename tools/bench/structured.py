"""Structured generation: what a response format costs per decode step, on SmolLM2.

In process: the time to build the vocabulary's token table (a model's first constrained
call pays it), to compile the README's triage schema (docs/examples/triage.schema.json),
and to compute one token mask along a triage reply. Served: interleaved rounds of the same
triage chats, greedy, free and under the schema, from 1 and from 4 callers at once; the
median inter-token latency of each, pooled over the round's generations. The target is the
median ITL under the schema within 1.1x the free one at 1 caller: the next step's mask is
computed while the current decode step runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.bench.generation import Server, percentile_ms

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "examples" / "triage.schema.json"
SYSTEM = (
    "You triage customer support tickets. Reply with a JSON object: the ticket's category, its "
    "priority, a one-sentence summary, the order number if the ticket gives one, and whether a "
    "person must handle it."
)
TICKETS = [
    "I was charged twice for my March invoice (order 55120). Please refund the second payment.",
    "I can't log in since yesterday, the password reset email never arrives.",
    "The app crashes every time I open the settings page on Android 14.",
    "Where is my package? Order 88231 has said 'in transit' for ten days.",
]
MAX_NEW_TOKENS = 96


def in_process(model_dir: Path, repeats: int) -> dict[str, Any]:
    """Token table, schema compile and per-step mask times, ms."""
    from tokenizers import Tokenizer

    from sidecar.domain import FormatKind, ResponseFormat
    from sidecar.generation.formats import Grammars
    from sidecar.models.manifest import read_manifest

    manifest = read_manifest(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = manifest.generation.eos_token_ids if manifest.generation else ()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    schema = SCHEMA_FILE.read_text()
    began = time.perf_counter()
    grammars = Grammars(tokenizer, eos, vocab)
    grammars.constraint(ResponseFormat(FormatKind.JSON_OBJECT))  # builds the token table
    table_ms = 1000 * (time.perf_counter() - began)
    compiles = []
    for n in range(repeats):
        # A description changes the text, not the grammar: every compile misses the cache.
        varied = json.dumps({**json.loads(schema), "description": f"run {n}"})
        began = time.perf_counter()
        grammars.constraint(ResponseFormat(FormatKind.JSON_SCHEMA, varied))
        compiles.append(time.perf_counter() - began)
    reply = json.dumps(
        {
            "category": "billing",
            "priority": "high",
            "summary": "The customer was charged twice for the March invoice and wants a refund.",
            "order_id": "55120",
            "needs_human": False,
        }
    )
    masks = []
    for _ in range(repeats):
        constraint = grammars.constraint(ResponseFormat(FormatKind.JSON_SCHEMA, schema))
        for token in tokenizer.encode(reply, add_special_tokens=False).ids:
            began = time.perf_counter()
            constraint.compute()
            masks.append(time.perf_counter() - began)
            constraint.consume(token)
    return {
        "vocab": vocab,
        "token_table_ms": table_ms,
        "compile_p50_ms": percentile_ms(compiles, 0.5),
        "compile_p99_ms": percentile_ms(compiles, 0.99),
        "mask_p50_ms": percentile_ms(masks, 0.5),
        "mask_p99_ms": percentile_ms(masks, 0.99),
        "mask_steps": len(masks),
    }


async def _generations(
    address: str, callers: int, count: int, *, constrained: bool
) -> dict[str, Any]:
    """`count` triage chats from `callers` callers; their ITL pooled and their token counts."""
    import grpc

    from sidecar.v1 import inference_pb2 as pb
    from sidecar.v1.inference_pb2_grpc import InferenceStub

    schema = SCHEMA_FILE.read_text()
    gaps: list[float] = []
    tokens: list[int] = []
    finishes: dict[str, int] = {}
    numbers = iter(range(count))

    async def caller(stub: InferenceStub) -> None:
        for number in numbers:
            request = pb.GenerateRequest(
                messages=[
                    pb.ChatMessage(role="system", content=SYSTEM),
                    pb.ChatMessage(role="user", content=TICKETS[number % len(TICKETS)]),
                ],
                max_new_tokens=MAX_NEW_TOKENS,
                temperature=0.0,
            )
            if constrained:
                request.response_format.json_schema = schema
            stamps, made, finish = [], 0, 0
            async for reply in stub.Generate(request, timeout=600):
                if reply.token_ids:
                    stamps.append(time.perf_counter())
                    made += len(reply.token_ids)
                finish = reply.finish_reason or finish
            gaps.extend(b - a for a, b in itertools.pairwise(stamps))
            tokens.append(made)
            name = pb.FinishReason.Name(finish)
            finishes[name] = finishes.get(name, 0) + 1

    async with grpc.aio.insecure_channel(address) as channel:
        stub = InferenceStub(channel)
        await asyncio.gather(*(caller(stub) for _ in range(callers)))
    return {
        "generations": len(tokens),
        "tokens_mean": statistics.mean(tokens),
        "itl_p50_ms": percentile_ms(gaps, 0.5),
        "itl_p99_ms": percentile_ms(gaps, 0.99),
        "finishes": finishes,
    }


def run(args: Any, model_dir: Path, sidecar: Server) -> dict[str, Any]:
    """The in-process figures, then interleaved free / schema rounds at 1 and 4 callers."""
    print("  in process: token table, triage schema compile, mask per step ...", flush=True)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "in_process": in_process(model_dir, 3 if args.quick else 20),
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    inproc = result["in_process"]
    print(
        f"  token table {inproc['token_table_ms']:.0f} ms; compile p50 "
        f"{inproc['compile_p50_ms']:.2f} ms; mask p50 {inproc['mask_p50_ms']:.3f} "
        f"p99 {inproc['mask_p99_ms']:.3f} ms over {inproc['mask_steps']} steps",
        flush=True,
    )
    with sidecar(model_dir, args.device, list(args.server_args)) as address:
        result["rounds"] = asyncio.run(_served(address, args.gen_rounds, quick=args.quick))
    return result


async def _served(address: str, rounds: int, *, quick: bool) -> list[dict[str, Any]]:
    """Each round: free and schema (the order swapped every round), 4 generations one after
    another from 1 caller, then one each from 4 callers at once."""
    await _generations(address, 1, 1, constrained=True)  # warm: the token table, the compile
    turns: list[dict[str, Any]] = []
    for round_ in range(rounds):
        turn: dict[str, Any] = {}
        order = [False, True] if round_ % 2 == 0 else [True, False]
        for callers in (1, 4):
            for constrained in order:
                label = f"{callers} caller{'s' if callers > 1 else ''}, " + (
                    "schema" if constrained else "free"
                )
                count = callers if quick else 4
                row = await _generations(address, callers, count, constrained=constrained)
                turn[label] = row
                print(
                    f"  {label:<20} #{round_ + 1}  ITL p50 {row['itl_p50_ms']:7.2f} p99 "
                    f"{row['itl_p99_ms']:7.2f} ms  {row['tokens_mean']:5.1f} tokens  "
                    f"{row['finishes']}",
                    flush=True,
                )
        turns.append(turn)
    return turns


def ratios(result: dict[str, Any], ratio: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """Median ITL under the schema / free, per round, medians; and the compile time."""

    def itl(callers: str) -> float:
        return statistics.median(
            r[f"{callers}, schema"]["itl_p50_ms"] / r[f"{callers}, free"]["itl_p50_ms"]
            for r in result["rounds"]
        )

    one, four = itl("1 caller"), itl("4 callers")
    compile_ms = result["in_process"]["compile_p50_ms"]
    return [
        ratio("schema / free median ITL, 1 caller (SmolLM2)", one, "<= 1.1", met=one <= 1.1),
        ratio("schema / free median ITL, 4 callers (SmolLM2)", four, "report", met=True),
        ratio("triage schema compile p50, ms", compile_ms, "report", met=True),
    ]


def table(result: dict[str, Any]) -> str:
    """The served rounds as a text table."""
    head = f"{'structured (SmolLM2)':<26}{'ITL p50':>9}{'ITL p99':>9}{'tokens':>8}  finishes"
    lines = [head, "-" * len(head)]
    for number, turn in enumerate(result["rounds"], 1):
        for label, row in turn.items():
            lines.append(
                f"{label + ' #' + str(number):<26}{row['itl_p50_ms']:>9.2f}"
                f"{row['itl_p99_ms']:>9.2f}{row['tokens_mean']:>8.1f}  {row['finishes']}"
            )
    return "\n".join(lines)
