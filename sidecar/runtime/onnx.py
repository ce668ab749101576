"""ONNX Runtime backend: one InferenceSession per model, shared by executor threads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from sidecar.errors import ModelLoadError
from sidecar.runtime.backend import Arrays
from sidecar.runtime.devices import CUDA, canonical_device, onnx_providers


def _session(path: Path, providers: list[tuple[str, dict[str, Any]]], threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Calls come from a few executor threads; operator-level parallelism is intra-op.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from None


class OnnxBackend:
    """A model file in an ONNX Runtime session on the CPU or CUDA provider.

    With `half_lane` (CPU only, more than one intra-op thread) a second session of the same
    file runs on half the threads, so that while a queue is deep two passes run side by
    side, each on half the cores, instead of one pass split across all of them: for short
    inputs the threads of a split pass spend much of their time waiting for each other at
    every operator. The lane costs a second copy of the weights and its own memory arena.
    """

    name = "onnx"

    def __init__(
        self,
        path: Path,
        device: str,
        intra_op_threads: int = 0,
        *,
        half_lane: bool = False,
    ) -> None:
        providers = onnx_providers(device, ort.get_available_providers())
        self._session = _session(path, providers, intra_op_threads)
        self.intra_op_threads = intra_op_threads
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
        # Half of one thread (or of the runtime's own count, 0) is no lane of its own.
        wanted = half_lane and self.device == "cpu" and intra_op_threads > 1
        self.half_threads = intra_op_threads // 2 if wanted else 0
        self._half: Any = _session(path, providers, self.half_threads) if wanted else None

    def run(self, inputs: Arrays, threads: int | None = None) -> dict[str, npt.NDArray[np.float32]]:
        """Feed the inputs the graph declares (others are ignored) and return every output.

        `threads=half_threads` runs on the half lane where there is one; anything else
        runs on the session built with `intra_op_threads`.
        """
        feed = {name: inputs[name] for name in self.input_names}
        half = threads is not None and threads == self.half_threads
        session = self._half if half and self._half is not None else self._session
        outputs = session.run(None, feed)
        return dict(zip(self.output_names, outputs, strict=True))
