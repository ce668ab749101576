"""Pre-exported ONNX graphs: the one to import from a dir (model.onnx, or onnx/model*.onnx as
Hub repositories lay them out), copying it into a model dir, and what the graph shows of
itself (inputs, outputs, embedding table, quantization)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import weights
from export.errors import ExportError

# Where repositories keep graphs, preferred first: the unquantized one when there are several.
_DEFAULTS = ("model.onnx", "onnx/model.onnx")
_PATTERNS = ("*.onnx", "onnx/*.onnx")
# Graphs of optimum's several-file layouts, which the sidecar does not serve from one file: an
# encoder-decoder's halves, a decoder split into first-step and cached-step graphs, or merged
# into one that switches between them on a use_cache_branch input.
_SPLIT = ("encoder_model", "decoder_model", "decoder_with_past_model")
# Operators that show how weights were quantized.
_QUANTIZED_OPS = {
    "MatMulNBits": "int4",
    "GatherBlockQuantized": "int4",
    "MatMulBnb4": "bnb4",
    "MatMulInteger": "int8",
    "DynamicQuantizeMatMul": "int8",
    "QLinearMatMul": "int8",
    "QAttention": "int8",
    "DynamicQuantizeLinear": "int8",
}
# QDQ graphs: weights stored quantized and dequantized in the graph, by element type.
_DEQUANTIZED_TYPES = {"INT4": "int4", "UINT4": "int4", "INT8": "int8", "UINT8": "int8"}
# Ops a token id passes through on its way to the embedding table's Gather.
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}
# Ops between a quantized table and the Gather that reads it.
_DEQUANTIZE = {"DequantizeLinear", "Cast", "Mul", "Identity"}


def _inside(relative: str) -> bool:
    """Whether a relative name stays inside its dir. Judged by the name, not by resolving it:
    the Hugging Face cache keeps a snapshot's files as links into its blobs/ dir."""
    parts = Path(os.path.normpath(relative)).parts
    return not Path(relative).is_absolute() and bool(parts) and parts[0] != ".."


def graphs(path: Path) -> list[str]:
    """The ONNX graphs in a dir, as paths relative to it."""
    found = {str(p.relative_to(path)) for pattern in _PATTERNS for p in path.glob(pattern)}
    return sorted(found)


def find_graph(path: Path, chosen: str | None) -> Path | None:
    """The graph to import: `chosen` (a path in the dir), else the dir's own when it holds no
    PyTorch weights; None when the export should start from the weights."""
    found = graphs(path)
    if chosen:
        graph = path / chosen
        if not _inside(chosen):
            raise ExportError(
                f"--onnx-file {chosen}: name a graph inside {path}, as a path relative to it "
                "(such as onnx/model.onnx)"
            )
        if not graph.is_file() or graph.suffix != ".onnx":
            listed = ", ".join(found) or "none"
            raise ExportError(
                f"--onnx-file {chosen}: there is no such ONNX graph in {path} (graphs there: "
                f"{listed})"
            )
        return _importable(path, graph)
    if not found or weights.has_weights(path):
        return None
    if all(Path(name).stem.startswith(_SPLIT) for name in found):
        return _importable(path, path / found[0])  # refused, saying why
    default = next((name for name in _DEFAULTS if name in found), None)
    if default is None and len(found) > 1:
        raise ExportError(
            f"{path} holds {len(found)} ONNX graphs ({', '.join(found)}) and no PyTorch "
            "weights: pass --onnx-file to choose the one to import"
        )
    return _importable(path, path / (default or found[0]))


def _importable(path: Path, graph: Path) -> Path:
    if graph.stem.startswith(_SPLIT):
        raise ExportError(
            f"{graph.relative_to(path)} belongs to an export in several graphs (an encoder, "
            "decoders with and without past, or a decoder merged with a use_cache_branch "
            "input), which the sidecar does not import: export the model from its PyTorch "
            "checkpoint instead"
        )
    return graph


def _external_data(model: Any) -> list[str]:
    """Files the graph keeps its large tensors in, relative to the graph."""
    from onnx.external_data_helper import uses_external_data

    names: set[str] = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(names)


def copy_graph(graph: Path, out: Path, name: str) -> Path:
    """Copy the graph into `out` as `name`, with its external data files under their names."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    target = out / name
    shutil.copy2(graph, target)
    for data in _external_data(model):
        source = graph.parent / data
        if not _inside(data) or not source.is_file():
            raise ExportError(
                f"{graph} keeps its weights in {data!r}, which is not a file beside it: "
                "copy the graph's whole directory"
            )
        (out / data).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out / data)
    return target


@dataclass(frozen=True)
class GraphFacts:
    """What an ONNX graph says of itself."""

    inputs: dict[str, list[Any] | None]
    outputs: dict[str, list[Any] | None]
    # Rows of the token embedding table, if it could be found.
    embedding_rows: int | None
    quantization: str
    quantized_ops: tuple[str, ...]
    opset: int


def inspect_graph(path: Path) -> GraphFacts:
    """Read inputs, outputs, embedding table and quantization without loading weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises its own DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX graph: {exc}") from None

    def shapes(values: Any) -> dict[str, list[Any] | None]:
        """Each value's dims (ints, or names of dynamic axes); None where none are declared."""
        return {
            v.name: (
                [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
                if tensor.HasField("shape")
                else None
            )
            for v in values
            for tensor in [v.type.tensor_type]
        }

    ops = {node.op_type for node in model.graph.node}
    quantized = tuple(sorted(ops & set(_QUANTIZED_OPS)))
    modes = {_QUANTIZED_OPS[op] for op in quantized}
    stored = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and stored.get(node.input[0]) in _DEQUANTIZED_TYPES:
            modes.add(_DEQUANTIZED_TYPES[stored[node.input[0]]])
            quantized = tuple(sorted({*quantized, "DequantizeLinear"}))
    bits = {
        attr.i
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
        for attr in node.attribute
        if attr.name == "bits"
    }
    if bits:
        modes = (modes - {"int4"}) | {f"int{b}" for b in bits}
    if not modes and any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        modes = {"fp16"}
    # Older graphs (IR version 3) list their initializers among the inputs too.
    inputs = {k: v for k, v in shapes(model.graph.input).items() if k not in stored}
    return GraphFacts(
        inputs=inputs,
        outputs=shapes(model.graph.output),
        embedding_rows=_embedding_rows(model),
        quantization="+".join(sorted(modes)) or "none",
        quantized_ops=quantized,
        opset=max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
    )


def _embedding_rows(model: Any) -> int | None:
    """Rows of the table the token ids index: the first Gather fed by input_ids."""
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    constants = {
        node.output[0]: list(attr.t.dims)
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    }
    producers = {out: node for node in model.graph.node for out in node.output}
    ids = {"input_ids"}
    for node in model.graph.node:  # ONNX keeps nodes in topological order
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input[1] in ids:
            return _rows(node.input[0], initializers, constants, producers)
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in ids:
            ids.update(node.output)
    return None


def _rows(
    name: str,
    initializers: dict[str, list[int]],
    constants: dict[str, list[int]],
    producers: dict[str, Any],
) -> int | None:
    """First dimension of the tensor `name`, followed back through dequantization."""
    for _ in range(8):
        dims = initializers.get(name) or constants.get(name)
        if dims:
            return int(dims[0])
        node = producers.get(name)
        if node is None or node.op_type not in _DEQUANTIZE:
            return None
        name = node.input[0]
    return None
