"""export/: manifests, validation, refusals, and Hub ids resolved offline from the HF cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.errors import ExportError, ValidationError
from sidecar.models.manifest import read_manifest, verify_files
from tests.conftest import export_quietly

BIN = Path(sys.executable).parent


def test_manifest_records_every_file_and_the_validation(
    minilm_dir: Path, minilm_source: Path
) -> None:
    data = json.loads((minilm_dir / "manifest.json").read_text())
    on_disk = {str(p.relative_to(minilm_dir)) for p in minilm_dir.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(data["files"]) == on_disk
    for rel, entry in data["files"].items():
        assert entry["sha256"] == hashlib.sha256((minilm_dir / rel).read_bytes()).hexdigest()
        assert entry["bytes"] == (minilm_dir / rel).stat().st_size
    assert {"model.onnx", "tokenizer.json", "config.json", "modules.json"} <= on_disk
    assert data["source"] == {"path": str(minilm_source), "hub_id": None, "revision": None}
    assert data["task"] == "feature-extraction"
    assert (data["max_length"], data["dimensions"]) == (
        256,
        384,
    )  # max_seq_length from sentence_bert_config.json
    assert data["pooling"] == {"mode": "mean", "normalize": True}
    assert data["opset"] >= 14
    assert {"torch", "transformers", "optimum", "optimum-onnx", "onnxruntime"} <= set(
        data["exported_by"]
    )
    validation = data["validation"]
    assert [case["batch"] for case in validation["cases"]] == [1, 4, 2]
    assert (
        validation["cases"][2]["seq_len"] == 256
    )  # the over-long batch was exercised at full length
    assert 0 < validation["max_abs_diff"] <= validation["atol"] == 1e-4
    verify_files(minilm_dir, read_manifest(minilm_dir))


def test_classifier_manifest_has_labels(classifier_dir: Path) -> None:
    manifest = read_manifest(classifier_dir)
    assert manifest.labels == ("billing", "bug", "account")
    assert manifest.multi_label is False
    assert manifest.max_length == 64
    assert manifest.pooling is None


def test_existing_model_dir_needs_force(classifier_source: Path, classifier_dir: Path) -> None:
    with pytest.raises(ExportError, match="already exists: pass --force"):
        export_quietly(classifier_source, classifier_dir)


def test_force_replaces_the_dir_and_leaves_nothing_else(
    classifier_source: Path, tmp_path: Path
) -> None:
    """From a checkpoint whose config is a link outside it, followed only when asked."""
    checkpoint, elsewhere = tmp_path / "checkpoint", tmp_path / "elsewhere"
    shutil.copytree(classifier_source, checkpoint)
    elsewhere.mkdir()
    (checkpoint / "config.json").rename(elsewhere / "config.json")
    (checkpoint / "config.json").symlink_to(elsewhere / "config.json")
    models = tmp_path / "models"
    out = models / "triage"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(ExportError, match=r"config\.json is a link to .* --follow-symlinks"):
        export_quietly(checkpoint, out, force=True)
    export_quietly(checkpoint, out, force=True, follow_symlinks=True)
    assert not (out / "stale.txt").exists()
    verify_files(out, read_manifest(out))
    assert [p.name for p in models.iterdir()] == ["triage"]
    assert not (out / "config.json").is_symlink()  # a copy: the dir stands on its own
    assert (out / "config.json").read_bytes() == (elsewhere / "config.json").read_bytes()


def test_outputs_beyond_atol_fail_and_leave_nothing(
    classifier_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "strict"
    with pytest.raises(
        ValidationError, match=r"differ from PyTorch by .* \(atol 1e-12, rtol 0e\+00\)"
    ):
        export_quietly(classifier_source, out, atol=1e-12, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_pickle_only_checkpoint_is_refused(classifier_source: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(classifier_source, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match=r"only pickle weights .* --allow-pickle"):
        export_quietly(pickled, tmp_path / "out")


def fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> str:
    """Lay a checkpoint out as huggingface_hub caches a download: each file in blobs/ under its
    hash, linked from snapshots/<commit>/, and refs/main naming the commit."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.mark.slow
def test_hub_id_offline_from_the_cache(classifier_source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    commit = fake_hub_cache(cache, "acme/tiny-triage", classifier_source)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "from-hub"
    done = subprocess.run(
        [
            BIN / "sidecar-export",
            "acme/tiny-triage",
            str(out),
            "--revision",
            "main",
            "--name",
            "triage",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "[1/5] finding checkpoint acme/tiny-triage" in done.stderr  # progress is shown
    assert "[5/5] moving the model dir into place" in done.stderr
    manifest = read_manifest(out)
    assert (manifest.source, manifest.source_revision, manifest.name) == (
        "acme/tiny-triage",
        commit,
        "triage",
    )

    missing = subprocess.run(
        [BIN / "sidecar-export", "acme/not-cached", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode == 1
    assert "acme/not-cached@main is not in the local Hugging Face cache" in missing.stderr
    assert not (tmp_path / "none").exists()
