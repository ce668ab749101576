"""The one mapping from errors to gRPC status codes."""

from __future__ import annotations

import logging

import grpc
import pytest

from sidecar import errors
from sidecar.grpc.status import CODES, rpc_status, status_of


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (errors.WrongTaskError, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.CancelledError, grpc.StatusCode.CANCELLED),
        (errors.NotImplementedYetError, grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_each_error_has_its_code_and_keeps_its_message(
    error: type[Exception], code: grpc.StatusCode
) -> None:
    assert status_of(error("what went wrong and how to fix it")) == (
        code,
        "what went wrong and how to fix it",
    )


def test_client_mistakes_are_never_internal() -> None:
    assert grpc.StatusCode.INTERNAL not in CODES.values()


def test_unexpected_errors_are_internal_without_details(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code, message = status_of(KeyError("secret internal detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message
    assert "Traceback" not in message
    ref = message.split("ref ")[1].split(")")[0]
    assert ref in caplog.text
    assert "secret internal detail" in caplog.text


def test_rpc_status_for_stream_items() -> None:
    status = rpc_status(errors.InvalidInputError("bad"))
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "bad")
