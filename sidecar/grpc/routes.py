"""The route table: for each unary Inference call, its converters and its dataplane call.

The servicers and the Stream dispatcher both serve every row of it: a unary call reads its
request from the RPC, a Stream item from the StreamRequest field named `item`, and both
answer with the same converted result. A new task adds its row here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from sidecar.dataplane.service import DataPlane
from sidecar.grpc import to_domain, to_proto


@dataclass(frozen=True)
class Route:
    """One call: protobuf request -> domain request -> dataplane -> domain result -> protobuf."""

    rpc: str  # the sidecar.v1.Inference method
    item: str  # its field in StreamRequest and StreamResponse
    parse: Callable[[Any], Any]
    call: Callable[[DataPlane, Any, float | None], Awaitable[Any]]
    answer: Callable[[Any], Message]


UNARY: tuple[Route, ...] = (
    Route("Embed", "embed", to_domain.embed, DataPlane.run, to_proto.embed),
    Route("Classify", "classify", to_domain.classify, DataPlane.run, to_proto.classify),
    Route("Tokenize", "tokenize", to_domain.tokenize, DataPlane.tokenize, to_proto.tokenize),
    Route(
        "ExtractEntities",
        "extract_entities",
        to_domain.extract_entities,
        DataPlane.run,
        to_proto.extract_entities,
    ),
    Route("Rerank", "rerank", to_domain.rerank, DataPlane.run, to_proto.rerank),
)

BY_ITEM = {route.item: route for route in UNARY}


async def serve(
    route: Route, dataplane: DataPlane, request: Message, deadline: float | None
) -> Message:
    """Answer one request along its route."""
    return route.answer(await route.call(dataplane, route.parse(request), deadline))
