"""Device selection for ONNX Runtime (the CUDA branch is checked without a GPU)."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.runtime.devices import CPU, CUDA, canonical_device, onnx_providers


def test_cpu_uses_only_the_cpu_provider() -> None:
    assert onnx_providers("cpu", [CUDA, CPU]) == [(CPU, {})]


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_cuda_picks_the_device_and_keeps_cpu_for_fallback_ops(device: str, index: int) -> None:
    assert onnx_providers(device, [CUDA, CPU]) == [(CUDA, {"device_id": index}), (CPU, {})]
    assert canonical_device(device) == f"cuda:{index}"


def test_cuda_without_onnxruntime_gpu_says_what_to_install() -> None:
    with pytest.raises(ConfigError, match=r"install the gpu extra .onnxruntime-gpu."):
        onnx_providers("cuda", [CPU])


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cpu:0", "cuda:-1", ""])
def test_bad_device_strings(device: str) -> None:
    with pytest.raises(ConfigError, match="is not one of cpu, cuda"):
        canonical_device(device)


def test_this_machine_has_the_cpu_provider() -> None:
    import onnxruntime as ort

    assert CPU in ort.get_available_providers()
