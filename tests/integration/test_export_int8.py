"""`sidecar-export --quantize int8`: real exports, measured against the fp32 export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.quality import texts
from sidecar.domain import ClassifyRequest, EmbedRequest
from sidecar.models.manifest import read_manifest, verify_files
from sidecar.serving.loader import load_model
from sidecar.serving.served import LoadedModel, ServedModel
from tests.conftest import export_quietly

BIN = Path(sys.executable).parent
# Left in the staging dir by the quantizer or by optimum, never meant for a model dir.
STRAYS = ("model.int8.onnx", "model-inferred.onnx", "ort_config.json")


@pytest.fixture(scope="module")
def classifier_int8_dir(classifier_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny single-label classifier exported with --quantize int8."""
    return export_quietly(
        classifier_source, tmp_path_factory.mktemp("models") / "triage-int8", quantize="int8"
    )


def direct(model: LoadedModel, request: object) -> Any:
    """The model's answer to a request run as one batch."""
    assert isinstance(model, ServedModel)
    return model.direct(request)


def on_disk(model_dir: Path) -> set[str]:
    return {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}


def test_int8_manifest_records_mode_and_quality(minilm_int8_dir: Path) -> None:
    data = json.loads((minilm_int8_dir / "manifest.json").read_text())
    assert data["format_version"] == 2  # older sidecars refuse it rather than misread it
    quantization = data["quantization"]
    assert quantization["mode"] == "int8-dynamic"
    assert quantization["per_channel"] is True
    assert quantization["reference"] == "fp32 export of the same checkpoint"
    # The feed-forward MatMuls (two per layer) stay fp32; the attention projections do not.
    assert len(quantization["fp32_nodes"]) == 12
    assert all("attention" not in node for node in quantization["fp32_nodes"])
    quality = quantization["quality"]
    assert quality["sentences"] == 24
    assert quality["gate"] == {"cosine_min": 0.99}
    assert 0.99 <= quality["cosine_min"] <= quality["cosine_mean"] < 1.0
    # The fp32 export was still validated against PyTorch before quantizing.
    assert data["validation"]["max_abs_diff"] <= data["validation"]["atol"]

    manifest = read_manifest(minilm_int8_dir)
    assert manifest.quantization == "int8-dynamic"
    assert manifest.quantization_quality["cosine_min"] == quality["cosine_min"]
    assert (manifest.onnx_file, manifest.dimensions) == ("model.onnx", 384)


def test_fp32_export_keeps_the_old_manifest_form(minilm_dir: Path) -> None:
    data = json.loads((minilm_dir / "manifest.json").read_text())
    assert (data["format_version"], data["quantization"]) == (1, "none")
    manifest = read_manifest(minilm_dir)
    assert (manifest.quantization, manifest.quantization_quality) == ("none", {})


def test_int8_model_is_much_smaller_and_holds_int8_weights(
    minilm_int8_dir: Path, minilm_dir: Path
) -> None:
    int8_bytes = (minilm_int8_dir / "model.onnx").stat().st_size
    fp32_bytes = (minilm_dir / "model.onnx").stat().st_size
    assert int8_bytes < 0.55 * fp32_bytes  # 44 MB against 90 MB
    graph = onnx.load(str(minilm_int8_dir / "model.onnx")).graph
    uint8_bytes = sum(
        len(init.raw_data) for init in graph.initializer if init.data_type == onnx.TensorProto.UINT8
    )
    assert uint8_bytes > 10_000_000  # the word embeddings and attention weights
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in graph.node}


def test_int8_dir_holds_only_the_manifest_files(minilm_int8_dir: Path) -> None:
    data = json.loads((minilm_int8_dir / "manifest.json").read_text())
    assert set(data["files"]) == on_disk(minilm_int8_dir) - {"manifest.json"}
    assert not set(STRAYS) & on_disk(minilm_int8_dir)
    assert [p.name for p in minilm_int8_dir.parent.iterdir()] == ["minilm-int8"]
    verify_files(minilm_int8_dir, read_manifest(minilm_int8_dir))


def test_int8_dir_serves_embeddings_close_to_fp32(minilm_int8_dir: Path, minilm_dir: Path) -> None:
    quantized = load_model("minilm-int8", minilm_int8_dir, read_manifest(minilm_int8_dir), "cpu", 2)
    reference = load_model("minilm", minilm_dir, read_manifest(minilm_dir), "cpu", 2)
    inputs = texts()
    request = EmbedRequest(model="", inputs=inputs, normalize=True, truncate=True)
    got, want = direct(quantized, request), direct(reference, request)
    assert got.dimensions == want.dimensions == 384
    cosines = [
        float(np.dot(a.values, b.values))
        for a, b in zip(got.embeddings, want.embeddings, strict=True)
    ]
    assert min(cosines) >= 0.99, cosines
    assert [e.truncated for e in got.embeddings][-2:] == [True, True]


@pytest.mark.slow
def test_failed_quality_gate_keeps_the_old_dir(minilm_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "minilm"
    out.mkdir()
    (out / "kept.txt").write_text("the previous export")
    done = subprocess.run(
        [
            BIN / "sidecar-export",
            str(minilm_source),
            str(out),
            "--force",
            "--quantize",
            "int8",
            "--int8-min-cosine",
            "1.0",  # int8 never matches fp32 exactly
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "[4/6] quantizing to int8 (dynamic) and comparing it with fp32: failed" in done.stderr
    assert "int8 embeddings drift from fp32: min cosine 0.9" in done.stderr
    assert "over 24 sentences is below --int8-min-cosine 1.0" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["minilm"]
    assert on_disk(out) == {"kept.txt"}


def test_classifier_int8_records_agreement(classifier_int8_dir: Path, classifier_dir: Path) -> None:
    manifest = read_manifest(classifier_int8_dir)
    assert manifest.quantization == "int8-dynamic"
    quality = manifest.quantization_quality
    # The tiny random classifier's int8 and fp32 probabilities differ by about 1e-4.
    assert quality["top1_agreement"] == 1.0
    assert quality["max_abs_prob_diff"] < 0.01
    assert quality["gate"] == {"top1_agreement": 0.9}
    assert "cosine_min" not in quality

    quantized = load_model("q", classifier_int8_dir, manifest, "cpu", 1)
    reference = load_model("r", classifier_dir, read_manifest(classifier_dir), "cpu", 1)
    inputs = texts()
    request = ClassifyRequest(model="", inputs=inputs, top_k=1, truncate=True)
    got, want = direct(quantized, request).results, direct(reference, request).results
    assert [r.labels[0].label for r in got] == [r.labels[0].label for r in want]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "int4"}, "--quantize 'int4' is not one of none, int8"),
        ({"quantize": "int8", "int8_min_cosine": 1.5}, "--int8-min-cosine must be between 0 and 1"),
        (
            {"quantize": "int8", "int8_min_agreement": float("nan")},
            "--int8-min-agreement must be between 0 and 1",
        ),
    ],
)
def test_bad_quantize_options_are_refused_up_front(
    classifier_source: Path, tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_quietly(classifier_source, tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []
