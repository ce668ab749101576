"""ONNX Runtime backend: one InferenceSession per model, shared by executor threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from sidecar.errors import ModelLoadError
from sidecar.runtime.backend import Arrays
from sidecar.runtime.devices import CUDA, canonical_device, onnx_providers


class OnnxBackend:
    """A model file in an ONNX Runtime session on the CPU or CUDA provider."""

    name = "onnx"

    def __init__(self, path: Path, device: str, intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Calls come from a few executor threads; operator-level parallelism is intra-op.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = onnx_providers(device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from None
        active = self._session.get_providers()
        if providers[0][0] == CUDA and active[0] != CUDA:
            # onnxruntime falls back to CPU silently when CUDA libraries are missing.
            raise ModelLoadError(
                f"{path}: CUDA was asked for but ONNX Runtime started on {active[0]}; "
                "check the CUDA and cuDNN libraries onnxruntime-gpu needs"
            )
        self.device = canonical_device(device)
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        # Declared shapes (ints or symbolic names) and element types, for the decoders that
        # build past key/value tensors themselves.
        self.input_shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        self.input_types = {i.name: str(i.type) for i in self._session.get_inputs()}
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, inputs: Arrays) -> dict[str, npt.NDArray[np.float32]]:
        """Feed the inputs the graph declares (others are ignored) and return every output."""
        feed = {name: inputs[name] for name in self.input_names}
        outputs = self._session.run(None, feed)
        return dict(zip(self.output_names, outputs, strict=True))
