"""Where an export starts: GGUF files and pre-exported ONNX graphs found by layout, what a graph
says of itself, the GGUF tokenizer metadata followed, and the CLI's one-line reasons."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import gguf, imported, source
from export.cli import _reason
from export.errors import ExportError, ValidationError


def touch(path: Path, content: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_a_gguf_file_or_a_dir_of_one_is_a_gguf_source(tmp_path: Path) -> None:
    model = touch(tmp_path / "dir" / "model.Q4_K_M.gguf")
    assert gguf.find(model) == model
    assert gguf.find(tmp_path / "dir") == model
    found = source.resolve(str(model))
    assert (found.gguf, found.path) == (model, model.parent)
    assert source.resolve(str(tmp_path / "dir")).gguf == model
    touch(tmp_path / "dir" / "model.Q8_0.gguf")
    with pytest.raises(ExportError, match=r"holds 2 GGUF files .* pass the one to export"):
        gguf.find(tmp_path / "dir")
    # Weights beside a GGUF win: the checkpoint is exported from them.
    touch(tmp_path / "both" / "model.gguf")
    touch(tmp_path / "both" / "model.safetensors")
    assert gguf.find(tmp_path / "both") is None
    with pytest.raises(ExportError, match=r"is a file but not a \.gguf model"):
        source.resolve(str(touch(tmp_path / "notes.txt")))


def test_onnx_graphs_are_found_by_layout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/model_q4.onnx"):
        touch(repo / name)
    assert imported.graphs(repo) == [
        "onnx/model.onnx",
        "onnx/model_q4.onnx",
        "onnx/model_quantized.onnx",
    ]
    assert imported.find_graph(repo, None) == repo / "onnx" / "model.onnx"
    assert imported.find_graph(repo, "onnx/model_q4.onnx") == repo / "onnx" / "model_q4.onnx"
    (repo / "onnx" / "model.onnx").unlink()
    with pytest.raises(ExportError, match=r"holds 2 ONNX graphs .* pass --onnx-file"):
        imported.find_graph(repo, None)
    with pytest.raises(ExportError, match=r"no such ONNX graph .* onnx/model_q4.onnx"):
        imported.find_graph(repo, "model.onnx")
    outside = touch(tmp_path / "elsewhere.onnx")
    for escape in ("../elsewhere.onnx", str(outside)):
        with pytest.raises(ExportError, match=r"name a graph inside .* as a path relative to it"):
            imported.find_graph(repo, escape)
    # Weights present: the export starts from them unless a graph is named.
    touch(repo / "model.safetensors")
    assert imported.find_graph(repo, None) is None
    assert imported.find_graph(repo, "onnx/model_q4.onnx") is not None
    single = tmp_path / "single"
    touch(single / "model.onnx")
    assert imported.find_graph(single, None) == single / "model.onnx"
    split = tmp_path / "split"
    touch(split / "onnx" / "encoder_model.onnx")
    with pytest.raises(ExportError, match=r"belongs to an export in several graphs"):
        imported.find_graph(split, None)


def _tiny_tagger(path: Path, quantized: bool) -> Path:
    """input_ids -> (Cast) -> Gather over a [50, 4] table (int8 + DequantizeLinear when
    quantized) -> logits."""
    table = np.arange(200, dtype=np.float32).reshape(50, 4)
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32)]
    if quantized:
        weights = [
            numpy_helper.from_array(table.astype(np.int8), "table_q"),
            numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["table_q", "scale"], ["table"]))
        nodes.append(helper.make_node("MatMulInteger", ["a", "b"], ["unused"]))
        inputs_extra = [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 1]),
            helper.make_tensor_value_info("b", TensorProto.UINT8, [1, 1]),
        ]
    else:
        weights = [numpy_helper.from_array(table.astype(np.float16), "table")]
        inputs_extra = []
    nodes.append(helper.make_node("Gather", ["table", "ids32"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tagger",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            *inputs_extra,
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_graph_facts(tmp_path: Path) -> None:
    facts = imported.inspect_graph(_tiny_tagger(tmp_path / "q.onnx", quantized=True))
    assert facts.embedding_rows == 50  # through Cast and DequantizeLinear
    # The table is stored as int8 and dequantized in the graph (QDQ), the MatMul is integer.
    assert (facts.quantization, facts.quantized_ops) == (
        "int8",
        ("DequantizeLinear", "MatMulInteger"),
    )
    assert facts.outputs == {"logits": ["batch", "seq", 4]}
    assert facts.opset == 17
    half = imported.inspect_graph(_tiny_tagger(tmp_path / "h.onnx", quantized=False))
    assert (half.embedding_rows, half.quantization) == (50, "fp16")
    # An IR-3 graph lists its initializers among its inputs: they are not inputs to feed.
    model = onnx.load(str(tmp_path / "h.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("table", TensorProto.FLOAT16, [50, 4]))
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    onnx.save(model, str(tmp_path / "ir3.onnx"))
    old = imported.inspect_graph(tmp_path / "ir3.onnx")
    assert list(old.inputs) == ["input_ids"]
    assert old.outputs == {"logits": None}  # no shape declared
    with pytest.raises(ExportError, match="is not a readable ONNX graph"):
        imported.inspect_graph(touch(tmp_path / "bad.onnx", b"not a graph"))


def test_external_data_is_copied_and_must_lie_beside_the_graph(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    graph = _tiny_tagger(tmp_path / "src" / "model.onnx", quantized=False)
    model = onnx.load(str(graph))
    onnx.save(
        model, str(graph), save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    out = tmp_path / "out"
    out.mkdir()
    copied = imported.copy_graph(graph, out, "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert onnx.load(str(copied)).graph.initializer[0].dims == [50, 4]
    # As the Hugging Face cache keeps them: links into a blobs/ dir.
    linked = tmp_path / "snapshot"
    linked.mkdir()
    (linked / "model.onnx").symlink_to(graph)
    (linked / "model.onnx_data").symlink_to(tmp_path / "src" / "model.onnx_data")
    again = tmp_path / "again"
    again.mkdir()
    imported.copy_graph(linked / "model.onnx", again, "model.onnx")
    assert (again / "model.onnx_data").read_bytes() == (out / "model.onnx_data").read_bytes()
    shutil.move(tmp_path / "src" / "model.onnx_data", tmp_path / "elsewhere")
    with pytest.raises(ExportError, match=r"keeps its weights in 'model.onnx_data'"):
        imported.copy_graph(graph, tmp_path / "out", "again.onnx")


class _Tokenizer:
    """What gguf._follow_metadata touches of a transformers tokenizer."""

    def __init__(self) -> None:
        self.vocab = ["<unk>", "<|im_start|>", "<|im_end|>"]
        self.bos_token: Any = "<|im_start|>"
        self.eos_token: Any = "<|im_start|>"
        self.unk_token: Any = "<unk>"
        self.pad_token: Any = None
        self.add_bos_token = True

    def convert_ids_to_tokens(self, index: int) -> str:
        return self.vocab[index]

    @property
    def bos_token_id(self) -> int:
        return self.vocab.index(self.bos_token)

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.bos_token_id, 0] if self.add_bos_token else [0]}


class _StubbornTokenizer(_Tokenizer):
    """A tokenizer class that keeps add_bos_token as a plain attribute and adds a BOS anyway."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.bos_token_id, 0]}


def test_the_gguf_tokenizer_metadata_wins() -> None:
    tokenizer = _Tokenizer()
    metadata = {
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,  # no add_eos_token attribute: left alone
    }
    changed = gguf._follow_metadata(tokenizer, metadata)
    assert changed == [
        "eos_token '<|im_start|>' -> '<|im_end|>'",
        "pad_token None -> '<|im_end|>'",
        "add_bos_token True -> False",
    ]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.add_bos_token) == (
        "<|im_end|>",
        "<|im_end|>",
        False,
    )
    assert gguf._follow_metadata(tokenizer, metadata) == []
    stubborn = gguf._follow_metadata(_StubbornTokenizer(), metadata)
    assert stubborn[-1] == (
        "but _StubbornTokenizer still adds a BOS where the file says add_bos_token false"
    )


def test_failures_read_as_one_line_with_what_to_do() -> None:
    assert _reason(ValidationError("ONNX outputs differ\nacross lines"), "m") == (
        "ONNX outputs differ across lines"
    )
    missing = _reason(ModuleNotFoundError("No module named 'sentencepiece'"), "m")
    assert "pip install 'transformers-sidecar[export]'" in missing
    assert "lower --validate-tokens" in _reason(MemoryError(), "m")
    assert _reason(OSError(28, "No space left on device", "/out/x"), "m") == (
        "cannot export m: No space left on device (/out/x)"
    )
    other = _reason(TypeError("forward() got an unexpected keyword"), "m")
    assert other.startswith("cannot export m: TypeError: forward() got an unexpected keyword")
    assert "--debug" in other


def test_an_imported_graph_is_held_to_its_task_config_and_tokenizer(tmp_path: Path) -> None:
    import dataclasses

    from export.checkpoint import CheckpointInfo
    from export.validate_imported import check_structure
    from sidecar.models.manifest import Task

    info = CheckpointInfo(task=Task.EXTRACT_ENTITIES, max_length=16, labels=("O", "B", "I", "X"))
    facts = imported.inspect_graph(_tiny_tagger(tmp_path / "t.onnx", quantized=False))
    found = check_structure(info, facts, {"vocab_size": 50}, vocab=40)
    assert (found["output"], found["embedding_rows"], found["tokenizer_vocab"]) == (
        "logits",
        50,
        40,
    )
    with pytest.raises(ValidationError, match=r"config.json says vocab_size 60"):
        check_structure(info, facts, {"vocab_size": 60}, vocab=40)
    with pytest.raises(ValidationError, match=r"table of 50 tokens but the tokenizer has 51"):
        check_structure(info, facts, {}, vocab=51)
    three = dataclasses.replace(info, labels=("O", "B", "I"))
    with pytest.raises(ValidationError, match=r"returns 4 values per token but there are 3"):
        check_structure(three, facts, {}, vocab=40)
    classify = dataclasses.replace(info, task=Task.CLASSIFY)
    with pytest.raises(ValidationError, match=r"of shape \['batch', 'seq', 4\].* rank 2"):
        check_structure(classify, facts, {}, vocab=40)
    undeclared = dataclasses.replace(facts, outputs={"logits": None})
    assert check_structure(three, undeclared, {}, vocab=40)["output"] == "logits"
    with pytest.raises(ValidationError, match=r"returns no outputs"):
        check_structure(info, dataclasses.replace(facts, outputs={}), {}, vocab=40)
    quantized = imported.inspect_graph(_tiny_tagger(tmp_path / "q.onnx", quantized=True))
    with pytest.raises(ValidationError, match=r"needs inputs \['a', 'b'\]"):
        check_structure(info, quantized, {}, vocab=40)
    generate = CheckpointInfo(task=Task.GENERATE, max_length=16)
    with pytest.raises(ValidationError, match=r"takes no past_key_values inputs"):
        check_structure(generate, facts, {}, vocab=40)
