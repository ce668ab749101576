"""Choosing ONNX Runtime execution providers for a configured device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.errors import ConfigError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def parse_device(device: str) -> tuple[str, int]:
    """Split "cpu", "cuda" or "cuda:1" into kind and index."""
    kind, sep, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (sep and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device {device!r} is not one of cpu, cuda, cuda:<index>")
    return kind, int(index or 0)


def canonical_device(device: str) -> str:
    """The device as responses report it: "cpu" or "cuda:<index>"."""
    kind, index = parse_device(device)
    return "cpu" if kind == "cpu" else f"cuda:{index}"


def onnx_providers(device: str, available: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Providers (with options) for a device, given what this onnxruntime build offers."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return [(CPU, {})]
    if CUDA not in available:
        raise ConfigError(
            f"device {device!r} needs the CUDA execution provider, but this onnxruntime build "
            f"offers only {', '.join(available)}: install the gpu extra (onnxruntime-gpu) "
            "in place of onnxruntime, or set device: cpu"
        )
    # CPU stays listed for the few operators the CUDA provider does not implement.
    return [(CUDA, {"device_id": index}), (CPU, {})]
