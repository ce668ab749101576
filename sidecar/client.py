"""`sidecar client`: call a running sidecar from the shell, to see a call working."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.config import is_local_address
from sidecar.errors import SidecarError
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc

PREVIEW = 8


def _print(message: Message) -> None:
    print(
        json.dumps(
            MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
        )
    )


def _call_options(args: argparse.Namespace) -> dict[str, Any]:
    """The deadline and, with a token, the authorization metadata of every call."""
    options: dict[str, Any] = {"timeout": args.timeout}
    if args.token:
        options["metadata"] = (("authorization", f"Bearer {args.token}"),)
    return options


def _read(path: str, flag: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token of --token-file, whitespace around it stripped."""
    if not args.token_file:
        return None
    token = _read(args.token_file, "--token-file").decode("ascii", "replace").strip()
    if not token:
        raise SidecarError(f"--token-file {args.token_file} is empty")
    return token


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to --address: TLS when any --tls option is given, else plain text."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SidecarError("--tls-cert and --tls-key go together: give both for mTLS, or neither")
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_server_name):
        if args.token and not is_local_address(args.address):
            print(
                f"warning: sending the token to {args.address} in plain text; use --tls-ca "
                "(or --tls) if the server has TLS",
                file=sys.stderr,
            )
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca, "--tls-ca") if args.tls_ca else None,
        private_key=_read(args.tls_key, "--tls-key") if args.tls_key else None,
        certificate_chain=_read(args.tls_cert, "--tls-cert") if args.tls_cert else None,
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    elif args.address.startswith("unix:"):
        # A socket path is no host name: check the certificate against localhost.
        options.append(("grpc.ssl_target_name_override", "localhost"))
    return grpc.secure_channel(args.address, credentials, options=options)


def _embed(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    response: pb.EmbedResponse = stub.Embed(
        pb.EmbedRequest(model=args.model, inputs=args.texts), **_call_options(args)
    )
    if not args.full:
        # Show a few values of each vector; --full prints them all.
        for embedding in response.embeddings:
            del embedding.values[PREVIEW:]
    return response


def _classify(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Classify(
        pb.ClassifyRequest(model=args.model, inputs=args.texts, top_k=args.top_k),
        **_call_options(args),
    )


def _tokenize(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Tokenize(
        pb.TokenizeRequest(model=args.model, inputs=args.texts), **_call_options(args)
    )


def _entities(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    aggregation = pb.AggregationStrategy.Value(f"AGGREGATION_STRATEGY_{args.aggregation.upper()}")
    return stub.ExtractEntities(
        pb.ExtractEntitiesRequest(model=args.model, inputs=args.texts, aggregation=aggregation),
        **_call_options(args),
    )


def _rerank(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    return stub.Rerank(
        pb.RerankRequest(
            model=args.model, query=args.query, inputs=args.passages, top_n=args.top_n
        ),
        **_call_options(args),
    )


def _generate(stub: inference_pb2_grpc.InferenceStub, args: argparse.Namespace) -> Message:
    """Print the text as it streams in; return the last message (usage, metadata)."""
    request = pb.GenerateRequest(model=args.model, max_new_tokens=args.max_new_tokens)
    if args.system is not None or args.chat:
        if args.system is not None:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    _set_format(request.response_format, args)
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.seed is not None:
        request.seed = args.seed
    request.stop.extend(args.stop)
    last = pb.GenerateResponse()
    for last in stub.Generate(request, **_call_options(args)):
        print(last.text, end="", flush=True)
    print()
    last.ClearField("text")
    last.ClearField("token_ids")
    return last


def _file_text(path: str) -> str:
    """A --json-schema or --grammar file's text, or a usage error naming it."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None


def _set_format(fmt: pb.ResponseFormat, args: argparse.Namespace) -> None:
    """The reply's format from --json-schema, --json-object, --regex, --choice or --grammar."""
    if args.json_schema is not None:
        fmt.json_schema = args.json_schema
    elif args.json_object:
        fmt.json_object.SetInParent()
    elif args.regex is not None:
        fmt.regex = args.regex
    elif args.choice:
        fmt.choice.values.extend(args.choice)
    elif args.grammar is not None:
        fmt.lark_grammar = args.grammar


def _call(args: argparse.Namespace) -> int:
    args.token = _token(args)
    with _channel(args) as channel:
        try:
            if args.call == "models":
                _print(
                    models_pb2_grpc.ModelsStub(channel).ListModels(
                        models_pb2.ListModelsRequest(), **_call_options(args)
                    )
                )
            elif args.call == "health":
                stub = health_pb2_grpc.HealthStub(channel)
                checked = stub.Check(
                    health_pb2.HealthCheckRequest(service=args.service), **_call_options(args)
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
    security = client.add_argument_group(
        "transport security", "TLS is used when any --tls option is given; plain text otherwise"
    )
    security.add_argument(
        "--tls", action="store_true", help="use TLS, checking the server against default roots"
    )
    security.add_argument("--tls-ca", metavar="FILE", help="PEM CA that signed the server's cert")
    security.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate (mTLS)")
    security.add_argument("--tls-key", metavar="FILE", help="PEM key of --tls-cert")
    security.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to check the server's certificate against (default: the address's host; "
        "localhost for unix: sockets)",
    )
    security.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token to send ('-': read it from stdin)",
    )
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
    generate.add_argument("--system", help="a system message: send the prompt as a chat turn")
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as a user turn (chat template)"
    )
    shape = generate.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema", metavar="FILE", type=_file_text, help="reply with JSON valid against it"
    )
    shape.add_argument("--json-object", action="store_true", help="reply with a JSON object")
    shape.add_argument("--regex", help="reply with text the regular expression matches")
    shape.add_argument(
        "--choice", action="append", default=[], help="reply with one of these (repeat)"
    )
    shape.add_argument(
        "--grammar", metavar="FILE", type=_file_text, help="reply in this Lark grammar (llguidance)"
    )
    calls.add_parser("models", help="list the served models")
    health = calls.add_parser("health", help="check grpc.health.v1")
    health.add_argument("--service", default="", help="service name ('' = overall)")
