"""Choosing ONNX Runtime execution providers for a configured device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.config import parse_device
from sidecar.errors import ConfigError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


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
