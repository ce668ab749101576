"""Manifest parsing, checksum verification and preflight refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.errors import ChecksumMismatchError, ModelLoadError
from sidecar.models.manifest import (
    FORMAT_VERSION,
    KEYS,
    Manifest,
    Task,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from sidecar.models.preflight import preflight
from sidecar.tasks import registry


def write_dir(tmp_path: Path, **overrides: object) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 100, "max_position_embeddings": 64})
    )
    data = {
        "format_version": FORMAT_VERSION,
        "name": "m",
        "task": "text-classification",
        "onnx_file": "model.onnx",
        "source": {"path": "/ckpt", "hub_id": None, "revision": None},
        "max_length": 32,
        "labels": ["a", "b"],
        "files": {
            name: {"sha256": sha256_file(tmp_path / name)} for name in ("model.onnx", "config.json")
        },
        **overrides,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_reads_and_verifies(tmp_path: Path) -> None:
    manifest = read_manifest(write_dir(tmp_path))
    assert (manifest.task, manifest.labels, manifest.source) == (Task.CLASSIFY, ("a", "b"), "/ckpt")
    assert manifest.digest.startswith("sha256:")
    assert len(manifest.digest) == 71
    verify_files(tmp_path, manifest)


def test_changed_file_is_caught(tmp_path: Path) -> None:
    manifest = read_manifest(write_dir(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"graph, edited")
    with pytest.raises(ChecksumMismatchError, match=r"model.onnx does not match its manifest"):
        verify_files(tmp_path, manifest)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="listed in the manifest but missing"):
        verify_files(tmp_path, manifest)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format_version": FORMAT_VERSION + 1}, "newer than this sidecar reads"),
        ({"task": "image-segmentation"}, "task 'image-segmentation' is not served"),
    ],
)
def test_refused_manifests(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        read_manifest(write_dir(tmp_path, **overrides))


def test_malformed_manifest_is_a_load_error(tmp_path: Path) -> None:
    write_dir(tmp_path, files={"model.onnx": {"size": 5}})  # no sha256
    with pytest.raises(ModelLoadError, match=r"manifest.json is malformed \(KeyError"):
        read_manifest(tmp_path)


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no manifest.json: it is not a model dir"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        read_manifest(tmp_path)


INPUTS = ("input_ids", "attention_mask")


def test_preflight_accepts_a_sound_dir(tmp_path: Path) -> None:
    preflight(
        tmp_path, read_manifest(write_dir(tmp_path)), vocab_size=100, pad_id=0, input_names=INPUTS
    )


def load_checks(
    model_dir: Path, manifest: Manifest, vocab: int, pad: int | None, inputs: tuple[str, ...]
) -> None:
    """What the loader checks: the dir as a whole, then what its task needs."""
    preflight(
        model_dir,
        manifest,
        vocab_size=vocab,
        pad_id=pad,
        input_names=inputs,
        task_checks=registry.check_manifest,
    )


@pytest.mark.parametrize(
    ("vocab", "pad", "inputs", "overrides", "message"),
    [
        (120, 0, INPUTS, {}, "tokenizer has 120 tokens but the model's embedding table has 100"),
        (100, None, INPUTS, {}, "no pad token"),
        (
            100,
            0,
            INPUTS,
            {"max_length": 128},
            "max_length 128 exceeds the model's 64 position embeddings",
        ),
        (100, 0, (*INPUTS, "pixel_values"), {}, r"needs inputs \['pixel_values'\]"),
        (100, 0, INPUTS, {"labels": []}, "needs labels"),
        (
            100,
            0,
            (),
            {"task": "text-generation", "generation": {"suppressed_token_ids": [3, 100]}},
            r"suppresses tokens \[100\], outside the model's vocabulary of 100",
        ),
    ],
)
def test_preflight_refusals(
    tmp_path: Path,
    vocab: int,
    pad: int | None,
    inputs: tuple[str, ...],
    overrides: dict[str, object],
    message: str,
) -> None:
    manifest = read_manifest(write_dir(tmp_path, **overrides))
    with pytest.raises(ModelLoadError, match=message):
        load_checks(tmp_path, manifest, vocab, pad, inputs)


def fields(**overrides: object) -> dict[str, object]:
    """Every field an export writes, for a small classifier."""
    entries: dict[str, object] = {
        "name": "m",
        "task": "text-classification",
        "source": {"path": "/ckpt", "hub_id": None, "revision": None},
        "exported_by": {"sidecar-export": "test"},
        "exported_at": "2026-12-02T00:00:00+00:00",
        "onnx_file": "model.onnx",
        "onnx_encoder_file": "",
        "weights": [],
        "opset": 17,
        "quantization": "none",
        "max_length": 32,
        "labels": ["a", "b"],
        "multi_label": False,
        "pooling": None,
        "dimensions": 0,
        "generation": None,
        "chat_template": "",
        "validation": None,
    }
    entries.update(overrides)
    return entries


def test_written_manifest_reads_back_with_every_file_checksummed(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    written = write_manifest(tmp_path, fields())
    assert list(written) == list(KEYS)
    assert written["format_version"] == 1  # the oldest format that holds a plain classifier
    assert set(written["files"]) == {"model.onnx", "tok/tokenizer.json"}
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(written, indent=2) + "\n"
    manifest = read_manifest(tmp_path)
    assert (manifest.name, manifest.task, manifest.labels) == ("m", Task.CLASSIFY, ("a", "b"))
    verify_files(tmp_path, manifest)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (fields(shape=[1]), r"unknown \['shape'\]"),
        ({k: v for k, v in fields().items() if k != "labels"}, r"missing \['labels'\]"),
    ],
)
def test_fields_outside_the_format_are_refused(
    tmp_path: Path, entries: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_manifest(tmp_path, entries)
    assert not (tmp_path / "manifest.json").exists()


def test_a_manifest_the_reader_refuses_fails_the_writer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="labels"):
        write_manifest(tmp_path, fields(labels="a,b"))
