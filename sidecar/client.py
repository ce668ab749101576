"""`sidecar client`: call a running sidecar from the shell, to see a call working."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc

PREVIEW = 8


def _print(message: Message) -> None:
    print(
        json.dumps(
            MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
        )
    )


def _embed(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    response: pb.EmbedResponse = stub.Embed(
        pb.EmbedRequest(model=args.model, inputs=args.texts), timeout=args.timeout
    )
    if not args.full:
        # Show a few values of each vector; --full prints them all.
        for embedding in response.embeddings:
            del embedding.values[PREVIEW:]
    return response


def _classify(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Classify(
        pb.ClassifyRequest(model=args.model, inputs=args.texts, top_k=args.top_k),
        timeout=args.timeout,
    )


def _tokenize(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Tokenize(
        pb.TokenizeRequest(model=args.model, inputs=args.texts), timeout=args.timeout
    )


def _entities(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    aggregation = pb.AggregationStrategy.Value(f"AGGREGATION_STRATEGY_{args.aggregation.upper()}")
    return stub.ExtractEntities(
        pb.ExtractEntitiesRequest(model=args.model, inputs=args.texts, aggregation=aggregation),
        timeout=args.timeout,
    )


def _rerank(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Rerank(
        pb.RerankRequest(
            model=args.model, query=args.query, inputs=args.passages, top_n=args.top_n
        ),
        timeout=args.timeout,
    )


def _generate(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    """Print the text as it streams in; return the last message (usage, metadata)."""
    request = pb.GenerateRequest(
        model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens
    )
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.seed is not None:
        request.seed = args.seed
    request.stop.extend(args.stop)
    last = pb.GenerateResponse()
    for last in stub.Generate(request, timeout=args.timeout):
        print(last.text, end="", flush=True)
    print()
    last.ClearField("text")
    last.ClearField("token_ids")
    return last


def _call(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.address) as channel:
        try:
            if args.call == "models":
                _print(
                    models_pb2_grpc.ModelsStub(channel).ListModels(
                        models_pb2.ListModelsRequest(), timeout=args.timeout
                    )
                )
            elif args.call == "health":
                stub = health_pb2_grpc.HealthStub(channel)
                checked = stub.Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
                )
                _print(checked)
                # A failing exit status, as probes and `helm test` read it.
                if checked.status != health_pb2.HealthCheckResponse.SERVING:
                    return 1
            else:
                calls = {
                    "embed": _embed,
                    "classify": _classify,
                    "tokenize": _tokenize,
                    "generate": _generate,
                    "entities": _entities,
                    "rerank": _rerank,
                }
                _print(calls[args.call](inference_pb2_grpc.InferenceStub(channel), args))
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def add_parser(commands: Any) -> None:
    """Add `client` and its calls to the `sidecar` command."""
    client = commands.add_parser("client", help="call a running sidecar", description=__doc__)
    client.add_argument("--address", default="127.0.0.1:50051", help="host:port or unix:/path.sock")
    client.add_argument("--model", default="", help="model name (default: the server's default)")
    client.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    client.set_defaults(run=_call)
    calls = client.add_subparsers(dest="call", required=True)
    embed = calls.add_parser("embed", help="embed texts")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--full", action="store_true", help="print every value, not the first 8")
    classify = calls.add_parser("classify", help="classify texts")
    classify.add_argument("texts", nargs="+")
    classify.add_argument("--top-k", type=int, default=0, help="best k labels (0: all)")
    found = calls.add_parser("entities", help="extract entities from texts")
    found.add_argument("texts", nargs="+")
    found.add_argument(
        "--aggregation", default="simple", choices=["none", "simple", "first", "average", "max"]
    )
    rerank = calls.add_parser("rerank", help="rank passages against a query")
    rerank.add_argument("query")
    rerank.add_argument("passages", nargs="+")
    rerank.add_argument("--top-n", type=int, default=0, help="best n passages (0: all)")
    tokenize = calls.add_parser("tokenize", help="tokenize texts")
    tokenize.add_argument("texts", nargs="+")
    generate = calls.add_parser("generate", help="generate text, printed as it streams")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=0, help="0: the model's default")
    generate.add_argument("--temperature", type=float, help="0 = greedy (default: the model's)")
    generate.add_argument("--seed", type=int, help="seed for sampling")
    generate.add_argument("--stop", action="append", default=[], help="stop sequence (repeat)")
    calls.add_parser("models", help="list the served models")
    health = calls.add_parser("health", help="check grpc.health.v1")
    health.add_argument("--service", default="", help="service name ('' = overall)")
