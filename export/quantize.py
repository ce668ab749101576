"""Dynamic int8 quantization of an exported model.onnx, with ONNX Runtime's quantizer.

Weights are stored as 8-bit integers; activations are quantized at run time, per batch.
What is quantized was chosen by measuring all-MiniLM-L6-v2 against its fp32 export on an
AVX2-only CPU (no VNNI; 8 x 128 tokens, 2 threads) and on quality.texts():

- every MatMul and embedding table: 4x smaller and 1.2x faster (1.35x with signed weights),
  but the worst cosine to fp32 is 0.96: the feed-forward MatMuls read LayerNorm and GELU
  outputs whose outlier channels one per-tensor activation scale cannot resolve;
- feed-forward MatMuls kept fp32 (this module): 2x smaller, 1.02-1.08x faster (1.16x for a
  single short input), worst cosine 0.993; signed weights here fall to 0.975, and per-tensor
  weights are no faster and slightly less close.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import ExportError

if TYPE_CHECKING:
    import onnx

# What `sidecar-export --quantize` accepts; "none" keeps the fp32 export.
CHOICES = ("none", "int8")
MODE = "int8-dynamic"
# Embedding tables (Gather) hold most of a small encoder's bytes; MatMul holds its compute.
OPERATORS = ("MatMul", "Gather")


# Measured on MiniLM, ORT's pre-processing changed neither speed nor quality, and its symbolic
# shape inference fails on optimum's graphs: its advice to run it is noise for users here.
class _DropPreprocessingHint(logging.Filter):
    """Hides ORT's advice to run its pre-processing step first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization logs through the root logger; scope the filter to this call.
    hint = _DropPreprocessingHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def fp32_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes to keep in fp32: those whose weight is a constant, non-square 2-D matrix.

    In a transformer encoder the square weights are the attention projections (hidden x
    hidden); the non-square ones are the feed-forward layers (hidden x intermediate and back),
    whose int8 error dominated the measurement above, and any head written as a MatMul.
    """
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        shape = shapes.get(node.input[1])
        if shape is not None and len(shape) == 2 and shape[0] != shape[1]:
            kept.append(node.name)
    return kept


def quantize_int8(fp32: Path, int8: Path) -> dict[str, Any]:
    """Write the dynamic int8 model of `fp32` to `int8`; return how it was quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Shapes and names only: the weights are read again by the quantizer itself.
    kept = fp32_matmuls(onnx.load(str(fp32), load_external_data=False))
    try:
        with _quiet_root_logger():
            quantize_dynamic(
                fp32,
                int8,
                op_types_to_quantize=list(OPERATORS),
                # Unsigned weights: the u8 x u8 kernels avoid the 16-bit saturation that
                # u8 x s8 risks on AVX2 without VNNI, and measured better here.
                weight_type=QuantType.QUInt8,
                # One scale per output channel: no slower than per-tensor, a little closer.
                per_channel=True,
                reduce_range=False,
                nodes_to_exclude=kept,
                # Only MatMuls with a constant weight; attention's activation x activation
                # products stay fp32.
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as exc:  # onnxruntime's quantizer raises whatever its passes raise
        raise ExportError(f"ONNX Runtime could not quantize {fp32.name} to int8: {exc}") from exc
    if not int8.is_file():
        raise ExportError(f"ONNX Runtime wrote no quantized model at {int8}")
    return {
        "mode": MODE,
        "weights": "uint8",
        "activations": "uint8, scaled per batch at run time",
        "per_channel": True,
        "operators": list(OPERATORS),
        "fp32_nodes": kept,
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "reference": "fp32 export of the same checkpoint",
    }
