"""Model dirs written by someone else: nothing in one reaches outside it, crashes the server or
fails without naming its file; each bad dir fails alone while the good ones serve."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from sidecar.config import ModelSettings
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import MANIFEST, sha256_file
from sidecar.serving.loader import check_torch_files
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc
from tests.conftest import channel_to, local_settings, serving


def manifest_of(model_dir: Path) -> dict:
    return json.loads((model_dir / MANIFEST).read_text())


def rewrite(model_dir: Path, change: Callable[[dict], None]) -> None:
    manifest = manifest_of(model_dir)
    change(manifest)
    (model_dir / MANIFEST).write_text(json.dumps(manifest))


def rehash(model_dir: Path) -> None:
    """Record the dir's current files in its manifest, so a damaged file passes the checksums
    and reaches the parser that has to refuse it."""

    def change(manifest: dict) -> None:
        for rel in manifest["files"]:
            manifest["files"][rel]["sha256"] = sha256_file(model_dir / rel)

    rewrite(model_dir, change)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# name -> (how the dir is damaged, a fragment the reason must hold)
Damage = Callable[[Path, Path], None]


def outside_files_entry(model_dir: Path, elsewhere: Path) -> None:
    (elsewhere / "notes.txt").write_text("another team's file\n")
    digest = sha256_file(elsewhere / "notes.txt")
    rewrite(model_dir, lambda m: m["files"].update({"../elsewhere/notes.txt": {"sha256": digest}}))


def absolute_files_entry(model_dir: Path, elsewhere: Path) -> None:
    (elsewhere / "notes.txt").write_text("another team's file\n")
    target = str(elsewhere / "notes.txt")
    digest = sha256_file(elsewhere / "notes.txt")
    rewrite(model_dir, lambda m: m["files"].update({target: {"sha256": digest}}))


def outside_graph(model_dir: Path, elsewhere: Path) -> None:
    shutil.move(model_dir / "model.onnx", elsewhere / "model.onnx")

    def change(manifest: dict) -> None:
        manifest["onnx_file"] = "../elsewhere/model.onnx"
        del manifest["files"]["model.onnx"]

    rewrite(model_dir, change)


def linked_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    shutil.move(model_dir / "tokenizer.json", elsewhere / "tokenizer.json")
    (model_dir / "tokenizer.json").symlink_to(elsewhere / "tokenizer.json")


def linked_manifest(model_dir: Path, elsewhere: Path) -> None:
    shutil.move(model_dir / MANIFEST, elsewhere / MANIFEST)
    (model_dir / MANIFEST).symlink_to(elsewhere / MANIFEST)


def pipe_manifest(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / MANIFEST).unlink()
    os.mkfifo(model_dir / MANIFEST)  # read at start-up, before the server listens


def linked_graph_dir(model_dir: Path, elsewhere: Path) -> None:
    """A subdirectory that is a link to another volume's dir."""
    (elsewhere / "onnx").mkdir()
    (model_dir / "onnx").symlink_to(elsewhere / "onnx")


def looping_link(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "loop").symlink_to("loop")


def listed_name(model_dir: Path, elsewhere: Path) -> None:
    rewrite(model_dir, lambda m: m.update(name=["triage"]))


def absolute_weights(model_dir: Path, elsewhere: Path) -> None:
    rewrite(model_dir, lambda m: m.update(weights=["/etc/passwd"]))


def panicking_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    """Parses, then panics in Rust on the first encode (a BaseException in Python)."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    del tokenizer["post_processor"]["special_tokens"]["[SEP]"]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    rehash(model_dir)


def wrong_types(model_dir: Path, elsewhere: Path) -> None:
    """Values ListModels would fail to write, for every model, if they were served."""
    rewrite(model_dir, lambda m: m.update(exported_by={"torch": 2}))


def lone_surrogate(model_dir: Path, elsewhere: Path) -> None:
    """Valid JSON (an escape), but no text protobuf or Prometheus can write."""
    raw = (model_dir / MANIFEST).read_text()
    (model_dir / MANIFEST).write_text(
        raw.replace('"source": {', '"source": {"note": "\\ud800", ', 1)
    )


def nested_manifest(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / MANIFEST).write_text(nested(100_000))


def garbage_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "tokenizer.json").write_text("{not json")
    rehash(model_dir)


def wrong_shape_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "tokenizer.json").write_text("[1, 2, 3]")
    rehash(model_dir)


def binary_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "tokenizer.json").write_bytes(b'{"version": "\xff\xfe"}')
    rehash(model_dir)


def nested_config(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "config.json").write_text('{"a": ' + nested(100_000) + "}")
    rehash(model_dir)


def huge_config(model_dir: Path, elsewhere: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["padding"] = "x" * (9 << 20)  # valid JSON, past the 8 MiB bound
    (model_dir / "config.json").write_text(json.dumps(config))
    rehash(model_dir)


def pipe_tokenizer(model_dir: Path, elsewhere: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    os.mkfifo(model_dir / "tokenizer.json")  # reading it would wait forever


DAMAGES: dict[str, tuple[Damage, str]] = {
    "outside-entry": (outside_files_entry, "files entry '../elsewhere/notes.txt' climbs out"),
    "absolute-entry": (absolute_files_entry, "is not a name inside the model dir"),
    "outside-graph": (outside_graph, "onnx_file '../elsewhere/model.onnx' climbs out"),
    "linked-tokenizer": (linked_tokenizer, "tokenizer.json is a link to"),
    "linked-graph-dir": (linked_graph_dir, "onnx is a link to"),
    "looping-link": (looping_link, "loop is a link that cannot be followed"),
    "listed-name": (listed_name, "name ['triage'] is not a model name"),
    "absolute-weights": (absolute_weights, "weights entry '/etc/passwd' is not a name inside"),
    "panicking-tokenizer": (panicking_tokenizer, "tokenizer.json cannot encode text"),
    "wrong-types": (wrong_types, "exported_by.torch must be a string, not 2"),
    "lone-surrogate": (lone_surrogate, "manifest.json holds text that is not valid Unicode"),
    "linked-manifest": (linked_manifest, "manifest.json is a link to"),
    "pipe-manifest": (pipe_manifest, "manifest.json is not a regular file"),
    "nested-manifest": (nested_manifest, "manifest.json is nested deeper than"),
    "garbage-tokenizer": (garbage_tokenizer, "tokenizer.json is not a tokenizer"),
    "wrong-shape-tokenizer": (wrong_shape_tokenizer, "tokenizer.json is not a tokenizer"),
    "binary-tokenizer": (binary_tokenizer, "tokenizer.json is not UTF-8 text (byte 13"),
    "nested-config": (nested_config, "config.json is nested deeper than"),
    "huge-config": (huge_config, "config.json is 9.0 MiB, more than the 8 MiB"),
    "pipe-tokenizer": (pipe_tokenizer, "tokenizer.json is not a regular file"),
}


@pytest.fixture(scope="module")
def damaged_dirs(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name, (damage, _) in DAMAGES.items():
        root = tmp_path_factory.mktemp(name)
        (root / "elsewhere").mkdir()
        model_dir = root / name
        shutil.copytree(classifier_dir, model_dir)
        damage(model_dir, root / "elsewhere")
        dirs[name] = model_dir
    return dirs


@pytest.fixture(scope="module")
def linked_inside(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kubernetes ConfigMap's layout: every file a link into `..data/` inside the dir."""
    model_dir = tmp_path_factory.mktemp("configmap") / "configmap"
    shutil.copytree(classifier_dir, model_dir / "..2026_12_02_00_00_00.000000000")
    (model_dir / "..data").symlink_to("..2026_12_02_00_00_00.000000000")
    for file in (model_dir / "..data").iterdir():
        (model_dir / file.name).symlink_to(Path("..data") / file.name)
    return model_dir


@pytest.fixture(scope="module")
def name_thief(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("thief") / "thief"
    shutil.copytree(classifier_dir, model_dir)
    rewrite(model_dir, lambda m: m.update(name="current"))
    return model_dir


@pytest.fixture(scope="module")
def linked_dir(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir that is itself a link (`models/current -> v3`)."""
    root = tmp_path_factory.mktemp("linked")
    shutil.copytree(classifier_dir, root / "v3")
    (root / "current").symlink_to(root / "v3")
    return root / "current"


@pytest.fixture(scope="module")
async def channel(
    damaged_dirs: dict[str, Path],
    linked_inside: Path,
    linked_dir: Path,
    multilabel_dir: Path,
    name_thief: Path,
) -> AsyncIterator[grpc.aio.Channel]:
    # First in the list and unnamed, its manifest claims the name of a model named below.
    models = [ModelSettings(path=name_thief)]
    models += [ModelSettings(path=path, name=name) for name, path in damaged_dirs.items()]
    models += [
        ModelSettings(path=linked_inside, name="configmap"),
        ModelSettings(path=linked_dir, name="current"),
        ModelSettings(multilabel_dir),
    ]
    settings = local_settings(*models, default_model="moderation")
    async with serving(settings) as server, channel_to(server) as channel:
        yield channel


@pytest.mark.parametrize("name", DAMAGES)
async def test_a_damaged_dir_fails_alone_naming_its_file(
    channel: grpc.aio.Channel, name: str
) -> None:
    answer = await models_pb2_grpc.ModelsStub(channel).GetModel(
        models_pb2.GetModelRequest(model=name)
    )
    model = answer.model
    assert model.state == models_pb2.MODEL_STATE_FAILED, model
    assert DAMAGES[name][1] in model.error, model.error
    inference = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference.Classify(pb.ClassifyRequest(model=name, inputs=["x"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert DAMAGES[name][1] in (caught.value.details() or "")


async def test_the_good_models_serve_beside_them(channel: grpc.aio.Channel) -> None:
    inference = inference_pb2_grpc.InferenceStub(channel)
    for name in ("moderation", "configmap", "current"):
        answer = await inference.Classify(pb.ClassifyRequest(model=name, inputs=["x"]), timeout=10)
        assert answer.results[0].labels, name


async def test_a_manifest_cannot_take_a_name_the_operator_gave(
    channel: grpc.aio.Channel, name_thief: Path
) -> None:
    models = models_pb2_grpc.ModelsStub(channel)
    listing = await models.ListModels(models_pb2.ListModelsRequest(), timeout=10)
    states = {m.name: m for m in listing.models}  # every model listed, the damaged ones too
    assert len(states) == len(DAMAGES) + 4
    thief = states[str(name_thief)]
    assert thief.state == models_pb2.MODEL_STATE_FAILED
    assert "its manifest names it 'current', the name of another model" in thief.error
    assert states["current"].state == models_pb2.MODEL_STATE_SERVING


def test_the_weights_index_may_name_only_shards_inside(tmp_path: Path) -> None:
    """transformers joins each weight_map entry to the dir unchecked: the torch backend
    checks them first."""
    index = {"weight_map": {"embed.weight": "../elsewhere/model-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    outside = re.escape("weight_map entry '../elsewhere/model-00001")
    with pytest.raises(ModelLoadError, match=outside):
        check_torch_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(ModelLoadError, match="has no weight_map object"):
        check_torch_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "generation_config.json").write_text('{"a": ' + nested(100_000) + "}")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json is nested deeper"):
        check_torch_files(tmp_path)
