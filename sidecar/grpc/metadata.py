"""The request metadata bound: one deterministic limit, and a refusal that names it.

gRPC core's own bound is probabilistic between its soft and hard limits (a 12 KB header
passed some calls and failed others) and often refuses with an empty message. The server
sets core's soft and hard limits equal at CORE_FACTOR times `max_metadata_bytes`, and this
interceptor refuses anything above `max_metadata_bytes` with a message saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from sidecar.grpc.refusal import refusing

if TYPE_CHECKING:
    from sidecar.grpc.refusal import Continuation

# RFC 7541 section 4.1: a header entry's size is its name's and value's octets plus 32.
ENTRY_OVERHEAD = 32
# gRPC core's own bound (soft = hard), past which core refuses before any interceptor runs.
CORE_FACTOR = 4


def metadata_size(metadata: Sequence[tuple[str, str | bytes]] | None) -> int:
    """The call's metadata as HTTP/2 counts it (core also counts the pseudo-headers)."""
    total = 0
    for key, value in metadata or ():
        if isinstance(value, bytes):  # a -bin entry: unpadded base64 on the wire
            size = (4 * len(value) + 2) // 3
        else:
            size = len(value.encode("utf-8", "replace"))
        total += len(key) + size + ENTRY_OVERHEAD
    return total


def core_options(limit: int) -> list[tuple[str, int]]:
    """gRPC core's metadata limits: soft = hard, so the same call always gets the same answer."""
    ceiling = limit * CORE_FACTOR
    return [("grpc.max_metadata_size", ceiling), ("grpc.absolute_max_metadata_size", ceiling)]


class MetadataLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose metadata exceeds `limit` bytes with RESOURCE_EXHAUSTED and a reason.

    `refused(rpc)` is called once per refused call (the server counts it in its metrics).
    """

    def __init__(self, limit: int, refused: Callable[[str, str], None]) -> None:
        self.limit = limit
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        size = metadata_size(handler_call_details.invocation_metadata)
        if handler is None or size <= self.limit:
            return handler
        rpc = handler_call_details.method.rpartition("/")[2]
        message = (
            f"the call's metadata is {size} bytes (names and values, plus {ENTRY_OVERHEAD} "
            f"per entry, as HTTP/2 counts them), over this server's limit of {self.limit} "
            "(max_metadata_bytes): send less metadata; the same call will always be refused"
        )

        async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._refused(rpc, grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return refusing(handler, refuse)
