"""The call envelope as gRPC uses it: its codes, its answer size limit, its status on failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from sidecar.dataplane.calls import Calls
from sidecar.dataplane.service import DataPlane
from sidecar.errors import PROPAGATE
from sidecar.grpc import to_domain
from sidecar.grpc.status import code_name, fail

Context = grpc.aio.ServicerContext[Any, Any]

# What a handler lets through: its own abort, cancellation and interpreter exit.
RERAISE: tuple[type[BaseException], ...] = (grpc.aio.AbortError, *PROPAGATE)


def grpc_calls(dataplane: DataPlane) -> Calls:
    """The call envelope with gRPC's codes and answer size limit."""
    return Calls(
        dataplane.admission,
        dataplane.telemetry,
        dataplane.settings.max_message_bytes,
        code_name,
    )


async def answered(
    calls: Calls,
    rpc: str,
    request: Any,
    context: Context,
    work: Callable[[Any], Awaitable[Message]],
) -> Message | None:
    """Run one unary call in the envelope: an exception ends it as a mapped status."""
    try:
        async with calls.call(rpc, getattr(request, "model", "")) as call:
            response = await work(to_domain.checked(request))
            metadata = getattr(response, "metadata", None)
            call.check_answer(response.ByteSize(), getattr(metadata, "model", ""))
            return response
    except RERAISE:
        raise
    except BaseException as exc:  # a tokenizer's Rust panic is a BaseException
        fail(context, exc)
        return None
