"""export/ for generation: decoder-only and seq2seq dirs, the torch backend's weights, torch-only
dirs for architectures optimum cannot export, and the refusals."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from export.cli import main as export_main
from export.errors import ExportError, ValidationError
from export.pipeline import export_model
from export.progress import Progress
from sidecar.models.manifest import Task, read_manifest, verify_files
from tests.checkpoints import CHAT_TEMPLATE, build_starcoder2
from tests.conftest import export_quietly


@pytest.fixture(scope="module")
def starcoder2_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint of an architecture optimum-onnx has no ONNX export for."""
    return build_starcoder2(tmp_path_factory.mktemp("ckpt") / "starcoder2")


def on_disk(model_dir: Path) -> set[str]:
    return {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()} - {
        "manifest.json"
    }


def check_files(model_dir: Path) -> None:
    """Every file but the manifest is listed with its sha256, and nothing else is."""
    data = json.loads((model_dir / "manifest.json").read_text())
    assert set(data["files"]) == on_disk(model_dir)
    for rel, entry in data["files"].items():
        assert entry["sha256"] == hashlib.sha256((model_dir / rel).read_bytes()).hexdigest()
    verify_files(model_dir, read_manifest(model_dir))


def test_gpt2_dir_holds_onnx_weights_and_chat_template(gpt2_dir: Path, gpt2_source: Path) -> None:
    files = on_disk(gpt2_dir)
    assert {"model.onnx", "model.safetensors", "chat_template.jinja", "tokenizer.json"} <= files
    assert {"config.json", "generation_config.json"} <= files
    assert [f for f in files if f.endswith(".onnx")] == ["model.onnx"]
    assert (gpt2_dir / "model.safetensors").read_bytes() == (
        gpt2_source / "model.safetensors"
    ).read_bytes()
    check_files(gpt2_dir)

    data = json.loads((gpt2_dir / "manifest.json").read_text())
    assert (data["format_version"], data["task"], data["max_length"]) == (3, "text-generation", 128)
    assert (data["onnx_file"], data["onnx_encoder_file"]) == ("model.onnx", "")
    assert data["weights"] == ["model.safetensors"]
    assert data["chat_template"] == "chat_template.jinja"
    assert (gpt2_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert data["generation"]["eos_token_ids"] == [0]
    assert data["generation"]["top_k"] == 50  # transformers' default, as generate() uses it


def test_gpt2_validation_covers_prefill_and_cached_steps(gpt2_dir: Path) -> None:
    validation = json.loads((gpt2_dir / "manifest.json").read_text())["validation"]
    assert validation["compared"] == "onnx-vs-pytorch"
    stages = [case["stage"] for case in validation["cases"]]
    assert stages == ["prefill", "cached step"] * 3 + ["batched cached step", "chunked prefill"]
    # The longest prompt leaves exactly one position for the cached step.
    assert max(case["seq_len"] for case in validation["cases"]) == 128
    batched, chunked = validation["cases"][-2:]
    assert batched["batch"] == 3
    # The long prompt's second half fed on top of its first half's cache.
    assert (chunked["seq_len"], chunked["first_position"]) == (127, 63)
    assert 0 < validation["max_abs_diff"] <= validation["atol"] == 1e-4
    assert 0 < validation["tolerance_used"] <= 1
    assert validation["next_token"]["top1_agreement"] == 1.0


def test_gpt2_manifest_parses(gpt2_dir: Path) -> None:
    manifest = read_manifest(gpt2_dir)
    assert manifest.task is Task.GENERATE
    assert manifest.backends == ("onnx", "torch")
    assert manifest.weights == ("model.safetensors",)
    assert manifest.chat_template == "chat_template.jinja"
    generation = manifest.generation
    assert generation is not None
    assert (generation.max_new_tokens, generation.eos_token_ids) == (24, (0,))
    assert (generation.bos_token_id, generation.pad_token_id, generation.do_sample) == (
        0,
        None,
        False,
    )
    assert manifest.validation is not None
    assert manifest.validation.max_abs_diff <= 1e-4


def test_bart_dir_keeps_the_encoder_and_the_merged_decoder_only(bart_dir: Path) -> None:
    files = on_disk(bart_dir)
    assert [f for f in sorted(files) if f.endswith(".onnx")] == [
        "decoder_model_merged.onnx",
        "encoder_model.onnx",
    ]
    assert "model.safetensors" in files
    assert "chat_template.jinja" not in files
    check_files(bart_dir)

    manifest = read_manifest(bart_dir)
    assert manifest.task is Task.SEQ2SEQ
    assert (manifest.onnx_file, manifest.onnx_encoder_file) == (
        "decoder_model_merged.onnx",
        "encoder_model.onnx",
    )
    assert (manifest.weights, manifest.chat_template, manifest.max_length) == (
        ("model.safetensors",),
        "",
        128,
    )
    generation = manifest.generation
    assert generation is not None
    assert generation.eos_token_ids == (2,)
    assert (generation.decoder_start_token_id, generation.forced_eos_token_id) == (2, 2)
    assert (generation.pad_token_id, generation.bos_token_id) == (1, 0)
    # No max_new_tokens in the checkpoint: 256, but never past the decoder's 128 positions.
    assert generation.max_new_tokens == 127


def test_bart_validation_covers_encoder_decoder_and_cached_steps(bart_dir: Path) -> None:
    validation = json.loads((bart_dir / "manifest.json").read_text())["validation"]
    stages = [case["stage"] for case in validation["cases"]]
    assert stages == ["encoder", "decoder start", "cached step"] * 3 + ["batched cached step"]
    assert 0 < validation["max_abs_diff"] <= validation["atol"] == 1e-4


def test_torch_backend_dir_has_no_onnx(gpt2_source: Path, tmp_path: Path) -> None:
    out = export_quietly(gpt2_source, tmp_path / "gpt2-torch", backend="torch")
    files = on_disk(out)
    assert not [f for f in files if f.endswith(".onnx")]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    check_files(out)
    data = json.loads((out / "manifest.json").read_text())
    assert (data["onnx_file"], data["opset"], data["format_version"]) == ("", 0, 3)
    assert data["validation"]["compared"] == "tokenizer-only"
    assert [case["seq_len"] for case in data["validation"]["cases"]][-1] == 127
    manifest = read_manifest(out)
    assert manifest.backends == ("torch",)
    assert manifest.generation is not None
    assert manifest.generation.max_new_tokens == 24


def test_auto_falls_back_to_torch_for_an_unexportable_architecture(
    starcoder2_source: Path, tmp_path: Path
) -> None:
    lines = io.StringIO()
    out = tmp_path / "starcoder2"
    export_model(str(starcoder2_source), out, progress=Progress(5, lines))
    assert (
        "[1/5] optimum has no ONNX export for model type 'starcoder2': falling back to the "
        "PyTorch backend (--backend torch)"
    ) in lines.getvalue()
    manifest = read_manifest(out)
    assert (manifest.task, manifest.onnx_file, manifest.backends) == (
        Task.GENERATE,
        "",
        ("torch",),
    )
    assert not list(out.glob("*.onnx"))
    check_files(out)


def test_onnx_backend_refuses_an_unexportable_architecture(
    starcoder2_source: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"model type 'starcoder2'.*pass --backend torch"):
        export_quietly(starcoder2_source, tmp_path / "out", backend="onnx")
    assert list(tmp_path.iterdir()) == []


def test_int8_is_refused_for_generation_and_for_torch(gpt2_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="int8 covers embedding and classification models only"):
        export_quietly(gpt2_source, tmp_path / "out", quantize="int8")
    with pytest.raises(ExportError, match="--backend torch has none"):
        export_quietly(gpt2_source, tmp_path / "out", quantize="int8", backend="torch")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["torch", "both"])
def test_torch_backend_needs_safetensors_even_with_allow_pickle(
    gpt2_source: Path, tmp_path: Path, backend: str
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(gpt2_source, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match="convert the checkpoint to safetensors"):
        export_quietly(pickled, tmp_path / "out", backend=backend, allow_pickle=True)
    assert not (tmp_path / "out").exists()


def test_generation_outputs_beyond_atol_fail(bart_source: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError,
        match=r"ONNX encoder outputs differ from PyTorch by .* \(atol 1e-12, rtol 0e\+00\)",
    ):
        export_quietly(bart_source, tmp_path / "strict", atol=1e-12, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_the_backends(
    gpt2_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_main([str(gpt2_source), str(tmp_path / "g"), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "(text-generation, served by torch)" in out
    assert "tokenizer checked on 3 inputs" in out
    assert export_main([str(gpt2_source), str(tmp_path / "g8"), "--quantize", "int8"]) == 1
    assert "int8 covers embedding and classification" in capsys.readouterr().err
