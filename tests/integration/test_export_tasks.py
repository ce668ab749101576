"""export/ for token classification, cross-encoder reranking and NLI zero-shot: detection,
manifest labels, validation on single texts and on pairs, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.errors import ExportError, ValidationError
from export.validate import PAIR_TRUNCATION, encode_pairs, pair_case
from sidecar.models.manifest import Task, read_manifest, verify_files
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks.tokenization import TextEncoder
from tests.checkpoints import NER_LABELS, NLI_LABELS
from tests.conftest import export_quietly

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("fixture", "task", "labels"),
    [
        ("token_classifier_dir", Task.EXTRACT_ENTITIES, tuple(NER_LABELS.values())),
        ("cross_encoder_dir", Task.RERANK, ("LABEL_0",)),
        ("nli_dir", Task.ZERO_SHOT, tuple(NLI_LABELS.values())),
    ],
)
def test_manifest_task_labels_and_validation(
    fixture: str, task: Task, labels: tuple[str, ...], request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    assert (manifest.task, manifest.labels, manifest.multi_label) == (task, labels, False)
    assert (manifest.onnx_file, manifest.weights) == ("model.onnx", ("model.safetensors",))
    assert manifest.backends == ("onnx", "torch")
    assert (manifest.max_length, manifest.dimensions, manifest.pooling) == (64, 0, None)
    data = json.loads((model_dir / "manifest.json").read_text())
    assert data["format_version"] == 3  # older sidecars refuse the task instead of misreading
    validation = data["validation"]
    assert validation["compared"] == "onnx-vs-pytorch"
    assert 0 <= validation["max_abs_diff"] <= validation["atol"] == 1e-4
    cases = validation["cases"]
    assert [c["batch"] for c in cases[:3]] == [1, 4, 2]
    pairs = [c for c in cases if "pairs" in c]
    if task in PAIR_TRUNCATION:
        # The pair batch reached the length limit, so truncation of one side was exercised.
        assert [(c["batch"], c["seq_len"], c["pairs"]) for c in pairs] == [
            (3, 64, PAIR_TRUNCATION[task])
        ]
    else:
        assert pairs == []


def test_token_classifier_outputs_per_token_logits(token_classifier_dir: Path) -> None:
    encoder = TextEncoder(token_classifier_dir, 64)
    batch = encoder.encode(["Refund not received.", "ok"], truncate=True)
    logits = OnnxBackend(token_classifier_dir / "model.onnx", "cpu").run(batch.feed())["logits"]
    assert logits.shape == (*batch.input_ids.shape, len(NER_LABELS))


@pytest.mark.parametrize("fixture", ["cross_encoder_dir", "nli_dir"])
def test_pair_encoding_keeps_the_untruncated_side(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    task = read_manifest(model_dir).task
    encoder = TextEncoder(model_dir, 64)
    pairs = pair_case(task, 64)
    batch = encode_pairs(encoder, pairs, task)
    long_row = 1  # pair_case's over-long pair
    assert batch.token_counts[long_row] == 64
    assert batch.truncated[long_row]
    kept = pairs[long_row][0] if task is Task.RERANK else pairs[long_row][1]
    kept_ids = encoder.encode_each([kept], truncate=False)[0].ids[1:-1]  # without [CLS]/[SEP]
    types = batch.token_type_ids[long_row]
    segment = 0 if task is Task.RERANK else 1
    # The kept side is whole: its segment holds exactly its ids (plus the separators).
    ids = batch.input_ids[long_row][(types == segment) & (batch.attention_mask[long_row] > 0)]
    start = 1 if segment == 0 else 0
    np.testing.assert_array_equal(ids[start : start + len(kept_ids)], kept_ids)
    assert len(ids) == len(kept_ids) + (2 if segment == 0 else 1)


def test_task_override_to_zero_shot_needs_an_entailment_label(
    classifier_source: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="has no entailment label"):
        export_quietly(classifier_source, tmp_path / "out", task=Task.ZERO_SHOT)
    assert list(tmp_path.iterdir()) == []


def test_task_override_to_rerank_needs_one_output(nli_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="reranking needs a cross-encoder"):
        export_quietly(nli_source, tmp_path / "out", task=Task.RERANK)


def test_nli_model_can_be_forced_to_plain_classification(nli_source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(export_quietly(nli_source, tmp_path / "out", task=Task.CLASSIFY))
    assert (manifest.task, manifest.labels[2]) == (Task.CLASSIFY, "entailment")


@pytest.mark.parametrize("fixture", ["token_classifier_source", "cross_encoder_source"])
def test_int8_is_refused(fixture: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source: Path = request.getfixturevalue(fixture)
    with pytest.raises(ExportError, match="int8 covers embedding and classification models only"):
        export_quietly(source, tmp_path / "out", quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_pair_outputs_beyond_atol_fail(nli_source: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match=r"differ from PyTorch by .* \(atol 1e-12, rtol 0e\+00\)"
    ):
        export_quietly(nli_source, tmp_path / "strict", atol=1e-12, rtol=0.0)


def test_torch_only_export_checks_pair_ids(cross_encoder_source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(export_quietly(cross_encoder_source, tmp_path / "t", backend="torch"))
    assert (manifest.task, manifest.backends) == (Task.RERANK, ("torch",))
    assert manifest.validation is not None
    assert manifest.validation.cases[-1]["pairs"] == "only_second"


@pytest.mark.slow
def test_cli_task_names(nli_source: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [BIN / "sidecar-export", str(nli_source), str(tmp_path / "nli")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "(zero-shot-classification, served by onnx)" in done.stdout
    refused = subprocess.run(
        [BIN / "sidecar-export", str(nli_source), str(tmp_path / "x"), "--task", "text-ranking"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert "reranking needs a cross-encoder" in refused.stderr
