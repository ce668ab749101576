"""Breaking exported ONNX graphs on purpose, so tests can show validation refuses them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def _rewire(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Every node input named in `renames` reads the new name instead."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]


def ignore_input(model: onnx.ModelProto, name: str) -> None:
    """The graph reads ones of the input's shape in its place: a mask wired to nothing."""
    shape, ones = f"{name}.shape", f"{name}.ones"
    _rewire(model.graph, {name: ones})
    value = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", [shape], [ones], value=value))
    model.graph.node.insert(0, helper.make_node("Shape", [name], [shape]))


def swap_inputs(model: onnx.ModelProto, first: str, second: str) -> None:
    """The graph reads each of two same-shaped inputs where it should read the other."""
    _rewire(model.graph, {first: second, second: first})


def drop_output(model: onnx.ModelProto, name: str) -> None:
    """The graph no longer returns `name`."""
    kept = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(kept)


def broken_copy(
    model_dir: Path, out: Path, graph: str, edit: Callable[[onnx.ModelProto], None]
) -> Path:
    """A copy of model_dir whose `graph` went through `edit`."""
    shutil.copytree(model_dir, out)
    model = onnx.load(str(out / graph))
    edit(model)
    onnx.save(model, str(out / graph))
    return out
