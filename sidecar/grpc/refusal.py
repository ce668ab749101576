"""A handler that ends a call with a status before the servicer sees it, for interceptors.

It has the shape (unary or streaming, each way) of the handler it stands in for, so gRPC
and the tracing interceptor treat the refused call like any other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # grpc's classes take no type arguments at run time
    Refuse = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
    # What a grpc.aio.ServerInterceptor's intercept_service is handed to reach the servicer.
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


def refusing(
    handler: grpc.RpcMethodHandler[Any, Any], refuse: Refuse
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler shaped like `handler` whose every call runs `refuse` (which aborts)."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # Streaming behaviours are async generators (the tracing interceptor iterates
        # them), so this one is too, though it never yields.
        await refuse(context)
        yield  # never reached: abort raises

    behavior: Callable[..., Any] = streaming if handler.response_streaming else unary
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
