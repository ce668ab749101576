"""Reading a checkpoint's task, labels, pooling and limits; where it comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import checkpoint, source
from sidecar.errors import ExportError
from sidecar.models.manifest import Task


def test_minilm_is_a_normalized_mean_pooled_embedder(minilm_source: Path) -> None:
    assert checkpoint.detect_task(minilm_source) is Task.EMBED
    info = checkpoint.inspect(minilm_source, Task.EMBED)
    assert (info.max_length, info.sentence_transformers) == (256, True)
    assert (info.pooling.mode, info.pooling.normalize) == ("mean", True)  # type: ignore[union-attr]


def test_flags_override_the_checkpoint(minilm_source: Path) -> None:
    info = checkpoint.inspect(
        minilm_source, Task.EMBED, max_length=128, pooling="cls", normalize=False
    )
    assert (info.max_length, info.pooling.mode, info.pooling.normalize) == (128, "cls", False)  # type: ignore[union-attr]
    capped = checkpoint.inspect(minilm_source, Task.EMBED, max_length=4096)
    assert capped.max_length == 512  # never past the position embeddings


def test_classifier_labels_and_problem_type(
    classifier_source: Path, multilabel_source: Path
) -> None:
    assert checkpoint.detect_task(classifier_source) is Task.CLASSIFY
    info = checkpoint.inspect(classifier_source, Task.CLASSIFY)
    assert (info.labels, info.multi_label, info.max_length) == (
        ("billing", "bug", "account"),
        False,
        64,
    )
    assert checkpoint.inspect(multilabel_source, Task.CLASSIFY).multi_label is True


def write_config(path: Path, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unknown_architecture_asks_for_task(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", architectures=["SomethingForImageSegmentation"])
    with pytest.raises(ExportError, match="pass --task"):
        checkpoint.detect_task(ckpt)


def test_classifier_without_labels(tmp_path: Path) -> None:
    ckpt = write_config(
        tmp_path / "c", architectures=["BertForSequenceClassification"], max_position_embeddings=32
    )
    with pytest.raises(ExportError, match="has no id2label"):
        checkpoint.inspect(ckpt, Task.CLASSIFY)


def test_combined_pooling_modes_are_refused(tmp_path: Path) -> None:
    ckpt = write_config(tmp_path / "c", max_position_embeddings=32)
    (ckpt / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (ckpt / "1_Pooling").mkdir()
    (ckpt / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(ExportError, match=r"combines pooling modes \['cls', 'max'\]"):
        checkpoint.inspect(ckpt, Task.EMBED)


def test_local_dirs_and_bad_names(tmp_path: Path, classifier_source: Path) -> None:
    assert source.resolve(str(classifier_source)).path == classifier_source
    with pytest.raises(ExportError, match="--revision applies to Hub ids"):
        source.resolve(str(classifier_source), revision="main")
    with pytest.raises(ExportError, match="neither a checkpoint directory nor a Hub id"):
        source.resolve(str(tmp_path / "missing"))
    with pytest.raises(ExportError, match="holds no safetensors weights"):
        source.check_weights(tmp_path, allow_pickle=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    source.check_weights(tmp_path, allow_pickle=True)
