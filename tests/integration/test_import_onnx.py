"""Pre-exported ONNX dirs: chosen by layout or --onnx-file, checked without PyTorch (graph
against task, config and tokenizer; itself alone against batched), refused when broken,
served like any model dir; and one clear line for every export failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import onnx
import pytest
import torch

from export.errors import ExportError, ValidationError
from sidecar.config import ModelSettings
from sidecar.models.manifest import read_manifest, verify_files
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1.inference_pb2_grpc import InferenceStub
from tests.conftest import channel_to, export_quietly, local_settings, serving
from tests.graph_surgery import broken_copy, ignore_input, swap_inputs
from tests.integration.test_export import fake_hub_cache

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# What a Hub repository that ships ONNX only holds beside its graphs.
_KEPT = (
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def onnx_only(model_dir: Path, out: Path, graphs: dict[str, str]) -> Path:
    """A dir laid out as ONNX-only Hub repos are: configs, tokenizer and graphs, no weights.
    `graphs` maps the path to create to the graph of model_dir it copies."""
    out.mkdir(parents=True)
    for name in _KEPT:
        if (model_dir / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / name, out / name)
    for target, graph in graphs.items():
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / graph, out / target)
    return out


@pytest.fixture(scope="module")
def classifier_repo(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classifier as a Hub repo with an fp32 and a second variant in onnx/."""
    repo = tmp_path_factory.mktemp("repos") / "triage-onnx"
    return onnx_only(
        classifier_dir,
        repo,
        {"onnx/model.onnx": "model.onnx", "onnx/model_quantized.onnx": "model.onnx"},
    )


def test_the_unquantized_graph_is_the_default_and_the_others_are_named(
    classifier_repo: Path, tmp_path: Path
) -> None:
    import io

    from export.pipeline import export_model
    from export.progress import Progress

    printed = io.StringIO()
    manifest = export_model(str(classifier_repo), tmp_path / "a", progress=Progress(5, printed))
    assert manifest["source"]["onnx_file"] == "onnx/model.onnx"
    assert "other graphs there (onnx/model_quantized.onnx): --onnx-file picks one" in (
        printed.getvalue()
    )
    validation = manifest["validation"]
    assert validation["compared"] == "onnx-self-consistency"
    assert validation["structure"]["embedding_rows"] == validation["structure"]["config_vocab_size"]
    stages = {case.get("stage") for case in validation["cases"]}
    assert "padded batch" in stages
    assert manifest["format_version"] == 4
    assert (manifest["labels"], manifest["onnx_file"]) == (
        ["billing", "bug", "account"],
        "model.onnx",
    )
    verify_files(tmp_path / "a", read_manifest(tmp_path / "a"))

    picked = export_quietly(classifier_repo, tmp_path / "b", onnx_file="onnx/model_quantized.onnx")
    assert read_manifest(picked).source == str(classifier_repo)
    assert json.loads((picked / "manifest.json").read_text())["source"]["onnx_file"] == (
        "onnx/model_quantized.onnx"
    )
    with pytest.raises(ExportError, match=r"--onnx-file onnx/missing.onnx: there is no such"):
        export_quietly(classifier_repo, tmp_path / "c", onnx_file="onnx/missing.onnx")


def test_several_graphs_without_a_default_need_a_choice(
    classifier_dir: Path, tmp_path: Path
) -> None:
    repo = onnx_only(
        classifier_dir,
        tmp_path / "repo",
        {"onnx/model_q4.onnx": "model.onnx", "onnx/model_fp16.onnx": "model.onnx"},
    )
    with pytest.raises(ExportError, match=r"holds 2 ONNX graphs .* pass --onnx-file"):
        export_quietly(repo, tmp_path / "out")
    split = onnx_only(classifier_dir, tmp_path / "split", {"onnx/decoder_model.onnx": "model.onnx"})
    with pytest.raises(ExportError, match=r"belongs to an export in several graphs"):
        export_quietly(split, tmp_path / "out2")


@pytest.fixture(scope="module")
def minilm_repo(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM as ONNX-only sentence-transformers repos ship it: onnx/model.onnx, no weights."""
    repo = tmp_path_factory.mktemp("repos") / "minilm-onnx"
    return onnx_only(minilm_dir, repo, {"onnx/model.onnx": "model.onnx"})


def test_a_graph_that_ignores_its_mask_is_refused(minilm_repo: Path, tmp_path: Path) -> None:
    # Each input alone has no padding; in a padded batch the graph now reads the padding.
    repo = broken_copy(
        minilm_repo,
        tmp_path / "no-mask",
        "onnx/model.onnx",
        lambda m: ignore_input(m, "attention_mask"),
    )
    with pytest.raises(
        ValidationError, match=r"padded batch token outputs differ from the same input alone by"
    ):
        export_quietly(repo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_match_the_graph_is_refused(
    classifier_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "mismatch"
    shutil.copytree(classifier_repo, repo)
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    with pytest.raises(ValidationError, match=r"config.json says vocab_size 999"):
        export_quietly(repo, tmp_path / "out")
    labels = {"0": "billing", "1": "bug"}
    (repo / "config.json").write_text(
        json.dumps({**config, "id2label": labels, "label2id": {v: k for k, v in labels.items()}})
    )
    with pytest.raises(ValidationError, match=r"returns 3 values per input but there are 2"):
        export_quietly(repo, tmp_path / "out")


def test_import_refuses_what_needs_weights(classifier_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"--backend both serves PyTorch weights"):
        export_quietly(classifier_repo, tmp_path / "a", backend="both")
    with pytest.raises(ExportError, match=r"--quantize applies to exports from PyTorch"):
        export_quietly(classifier_repo, tmp_path / "b", quantize="int8")


@pytest.fixture(scope="module")
def gpt2_repo(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2's with-past graph in an ONNX-only dir."""
    repo = tmp_path_factory.mktemp("repos") / "gpt2-onnx"
    return onnx_only(gpt2_dir, repo, {"model.onnx": "model.onnx"})


@pytest.fixture(scope="module")
def gpt2_import(gpt2_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_quietly(gpt2_repo, tmp_path_factory.mktemp("models") / "gpt2-imported")


def test_an_imported_decoder_with_its_cache_wired_wrongly_is_refused(
    gpt2_repo: Path, tmp_path: Path
) -> None:
    keys, values = "past_key_values.0.key", "past_key_values.0.value"
    repo = broken_copy(
        gpt2_repo, tmp_path / "swapped", "model.onnx", lambda m: swap_inputs(m, keys, values)
    )
    with pytest.raises(
        ValidationError,
        match=r"ONNX cached step outputs differ from the whole prompt without a cache",
    ):
        export_quietly(repo, tmp_path / "out")


def test_an_imported_decoder_is_checked_step_against_prompt(gpt2_import: Path) -> None:
    validation = json.loads((gpt2_import / "manifest.json").read_text())["validation"]
    assert validation["compared"] == "onnx-self-consistency"
    stages = [case.get("stage") for case in validation["cases"] if "stage" in case]
    assert stages == ["cached step"] * 3 + ["chunked prefill", "batched cached step"]
    assert validation["next_token"]["top1_agreement"] == 1.0
    assert read_manifest(gpt2_import).chat_template == "chat_template.jinja"


def quantized_dynamically(model: onnx.ModelProto) -> None:
    """The graph in place, as onnxruntime's quantize_dynamic writes Hub repos' int8 variants."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as work:
        onnx.save(model, f"{work}/fp32.onnx")
        quantize_dynamic(f"{work}/fp32.onnx", f"{work}/int8.onnx", weight_type=QuantType.QInt8)
        model.CopyFrom(onnx.load(f"{work}/int8.onnx"))


def in_float16(model: onnx.ModelProto) -> None:
    """The graph in place with float16 weights and float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model.CopyFrom(convert_float_to_float16(model, keep_io_types=True))


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_batch_dependent_graphs_are_held_to_what_callers_see(
    minilm_repo: Path, tmp_path: Path, variant: str
) -> None:
    # Dynamic int8 scales each batch by its own range and float16 rounds by shape, so their
    # outputs move with the batch: compared as served (cosine), not value by value.
    edit = quantized_dynamically if variant == "int8" else in_float16
    repo = broken_copy(minilm_repo, tmp_path / variant, "onnx/model.onnx", edit)
    manifest = export_quietly(repo, tmp_path / f"{variant}-out")
    validation = json.loads((manifest / "manifest.json").read_text())["validation"]
    assert validation["gate"] == {"cosine_min": 0.95}
    assert 0.95 <= validation["cosine_min"] <= 1.0
    assert read_manifest(manifest).quantization == variant
    # Still refused when the mask is wired to nothing.
    broken = broken_copy(
        repo,
        tmp_path / f"{variant}-no-mask",
        "onnx/model.onnx",
        lambda m: ignore_input(m, "attention_mask"),
    )
    with pytest.raises(ValidationError, match=r"embeddings in a padded batch are at cosine 0\."):
        export_quietly(broken, tmp_path / f"{variant}-broken")


def test_a_float16_decoder_is_held_to_its_next_tokens(gpt2_repo: Path, tmp_path: Path) -> None:
    repo = broken_copy(gpt2_repo, tmp_path / "fp16", "model.onnx", in_float16)
    out = export_quietly(repo, tmp_path / "out")
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert validation["gate"] == {"top1_agreement": 0.9}
    assert validation["top1_agreement"] >= 0.9
    stages = [case["stage"] for case in validation["cases"] if "stage" in case]
    assert stages == ["cached step"] * 3 + ["chunked prefill", "batched cached step"]


@pytest.fixture(scope="module")
def minilm_import(minilm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_quietly(minilm_repo, tmp_path_factory.mktemp("models") / "minilm-imported")


@pytest.fixture(scope="module")
async def imported_stub(
    gpt2_import: Path, minilm_import: Path, minilm_dir: Path
) -> AsyncIterator[InferenceStub]:
    settings = local_settings(
        ModelSettings(path=gpt2_import, name="gpt2"),
        ModelSettings(path=minilm_import, name="imported"),
        ModelSettings(path=minilm_dir, name="exported"),
    )
    async with serving(settings) as server, channel_to(server) as channel:
        yield InferenceStub(channel)


async def test_an_imported_decoder_generates_as_transformers(
    imported_stub: InferenceStub, gpt2_source: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_source).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_source)
    prompt = "Refund request: order 1234 never arrived."
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )[0, ids.shape[1] :].tolist()
    request = pb.GenerateRequest(model="gpt2", prompt=prompt, max_new_tokens=12, temperature=0)
    got = [t async for step in imported_stub.Generate(request, timeout=30) for t in step.token_ids]
    assert got == expected


async def test_an_imported_embedder_embeds_as_the_export_it_came_from(
    imported_stub: InferenceStub, minilm_import: Path
) -> None:
    manifest = read_manifest(minilm_import)
    assert manifest.pooling is not None
    assert (manifest.pooling.mode, manifest.pooling.normalize) == ("mean", True)
    assert (manifest.max_length, manifest.dimensions) == (256, 384)
    texts = ["Refund not received after 14 days", "App crashes on login", "ok"]
    imported = await imported_stub.Embed(pb.EmbedRequest(model="imported", inputs=texts))
    exported = await imported_stub.Embed(pb.EmbedRequest(model="exported", inputs=texts))
    for a, b in zip(imported.embeddings, exported.embeddings, strict=True):
        assert list(a.values) == list(b.values)


def test_a_hub_repo_of_onnx_graphs_imports_offline_with_onnx_file(
    classifier_repo: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    commit = fake_hub_cache(cache, "acme/triage-onnx", classifier_repo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "from-hub"
    done = subprocess.run(
        [BIN / "sidecar-export", "acme/triage-onnx", str(out), "--onnx-file", "onnx/model.onnx"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "imported without a PyTorch reference" in done.stdout
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source == {
        "path": None,
        "hub_id": "acme/triage-onnx",
        "revision": commit,
        "onnx_file": "onnx/model.onnx",
    }
    # Without --onnx-file a weightless Hub repo is refused with what to do.
    missing = subprocess.run(
        [BIN / "sidecar-export", "acme/triage-onnx", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode == 1
    assert "name it with --onnx-file" in missing.stderr


def test_every_export_failure_is_one_line_without_a_traceback(
    classifier_source: Path, tmp_path: Path
) -> None:
    # Weights that are not safetensors at all: transformers fails deep inside.
    garbage = tmp_path / "garbage"
    shutil.copytree(classifier_source, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    bad_json = tmp_path / "bad-json"
    shutil.copytree(classifier_source, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    for source in (garbage, bad_json):
        done = subprocess.run(
            [BIN / "sidecar-export", str(source), str(tmp_path / f"out-{source.name}")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("sidecar-export: "), done.stderr
        assert str(source) in last
        assert not (tmp_path / f"out-{source.name}").exists()
