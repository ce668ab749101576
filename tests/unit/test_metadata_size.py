"""Request metadata is measured as HTTP/2 carries it, so the bound means what it says."""

from __future__ import annotations

from sidecar.grpc.metadata import ENTRY_OVERHEAD, core_options, metadata_size


def test_text_entries_count_name_value_and_the_entry_overhead() -> None:
    assert metadata_size([("x-ticket", "é1")]) == 8 + 3 + ENTRY_OVERHEAD  # é is 2 UTF-8 bytes
    assert metadata_size(None) == 0


def test_binary_entries_count_as_unpadded_base64() -> None:
    """gRPC sends -bin values base64-encoded without padding: 3 bytes -> 4, 4 -> 6, 5 -> 7."""
    for raw, wire in ((3, 4), (4, 6), (5, 7), (0, 0)):
        assert metadata_size([("trace-bin", b"\0" * raw)]) == 9 + wire + ENTRY_OVERHEAD


def test_core_soft_and_hard_limits_are_equal() -> None:
    assert dict(core_options(16384)) == {
        "grpc.max_metadata_size": 65536,
        "grpc.absolute_max_metadata_size": 65536,
    }
