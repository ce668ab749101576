"""Turning a configured model dir into a loaded model: verify, preflight, load, warm up."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sidecar.errors import ModelLoadError
from sidecar.generation.chat import ChatTemplate
from sidecar.model_files import check_contained, read_json_object, read_text, relative_name
from sidecar.models.manifest import Manifest, Task, verify_files
from sidecar.models.preflight import preflight
from sidecar.runtime.backend import Backend, Decoder
from sidecar.runtime.onnx import OnnxBackend
from sidecar.runtime.onnx_decoder import OnnxCausalDecoder, OnnxSeq2SeqDecoder
from sidecar.serving.generative import GenerativeModel, special_tokens
from sidecar.serving.served import LoadedModel, ServedModel
from sidecar.tasks import registry
from sidecar.tasks.tokenization import TextEncoder

log = logging.getLogger(__name__)


def choose_backend(requested: str, manifest: Manifest, model_dir: Path) -> str:
    """ "onnx" or "torch": what was asked for, if the dir holds what that backend loads."""
    available = manifest.backends
    if requested == "auto":
        if not available:
            raise ModelLoadError(f"{model_dir} holds neither an ONNX graph nor PyTorch weights")
        return available[0]
    if requested not in available:
        how = "--backend both (or torch)" if requested == "torch" else "--backend onnx or both"
        raise ModelLoadError(
            f"backend {requested} was asked for, but {model_dir} holds no "
            f"{'PyTorch weights' if requested == 'torch' else 'ONNX graph'}: re-export it "
            f"with {how}, or set backend: auto"
        )
    return requested


def _encoder_backend(
    backend: str,
    model_dir: Path,
    manifest: Manifest,
    device: str,
    threads: int,
    dtype: str,
    *,
    half_lane: bool,
) -> Backend:
    if backend == "onnx":
        path = model_dir / manifest.onnx_file
        return OnnxBackend(path, device, threads, half_lane=half_lane)
    from sidecar.runtime.pytorch import TorchBackend  # torch is imported only when asked for

    return TorchBackend(model_dir, manifest.task, device, dtype)


def _decoder(
    backend: str, model_dir: Path, manifest: Manifest, device: str, threads: int, dtype: str
) -> Decoder:
    # registry.check_manifest refused a seq2seq dir without a decoder start token.
    start = manifest.generation.decoder_start_token_id if manifest.generation else None
    if backend == "onnx":
        if manifest.task is Task.GENERATE:
            return OnnxCausalDecoder(model_dir / manifest.onnx_file, device, threads)
        assert start is not None
        return OnnxSeq2SeqDecoder(
            model_dir / manifest.onnx_encoder_file,
            model_dir / manifest.onnx_file,
            device,
            start,
            threads,
        )
    from sidecar.runtime.pytorch import TorchCausalDecoder, TorchSeq2SeqDecoder

    if manifest.task is Task.GENERATE:
        return TorchCausalDecoder(model_dir, device, dtype)
    assert start is not None
    return TorchSeq2SeqDecoder(model_dir, device, start, dtype)


# What transformers' from_pretrained reads beside the weights the manifest names.
TORCH_JSON_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def check_torch_files(model_dir: Path) -> None:
    """Bound and check what transformers reads on its own, before it does: the configs, and
    the shard names in the weights index, which it joins to the dir without checking."""
    for name in TORCH_JSON_FILES:
        data = read_json_object(model_dir / name)
        if name.endswith(".index.json") and data is not None:
            shards = data.get("weight_map")
            if not isinstance(shards, dict):
                raise ModelLoadError(f"{model_dir / name} has no weight_map object")
            for shard in shards.values():
                relative_name(shard, "weight_map entry", model_dir / name)


def load_model(
    name: str,
    model_dir: Path,
    manifest: Manifest,
    device: str,
    intra_op_threads: int,
    *,
    verify_checksums: bool = True,
    backend: str = "auto",
    torch_dtype: str = "auto",
    half_lane: bool = False,
) -> LoadedModel:
    """Load one model dir; raises ModelLoadError (or ConfigError) naming what is wrong.

    `half_lane` gives an encoder on ONNX Runtime's CPU provider a second session on half
    its threads, for the batcher to run two passes side by side while its queue is deep.
    """
    started = time.perf_counter()
    # Before anything opens a file: ONNX Runtime and transformers read files never named.
    check_contained(model_dir)
    if verify_checksums:
        verify_files(model_dir, manifest)
    chosen = choose_backend(backend, manifest, model_dir)
    if chosen == "torch":
        check_torch_files(model_dir)
    encoder = TextEncoder(model_dir, manifest.max_length)
    encoder.check_encodes(pairs=registry.takes_pairs(manifest.task))
    model: LoadedModel
    if manifest.task.generative:
        preflight(model_dir, manifest, encoder.vocab_size, encoder.pad_id, ())
        registry.check_manifest(model_dir, manifest)
        decoder = _decoder(chosen, model_dir, manifest, device, intra_op_threads, torch_dtype)
        chat = None
        if manifest.chat_template:
            template = read_text(model_dir / manifest.chat_template)
            chat = ChatTemplate(template, special_tokens(model_dir))
        model = GenerativeModel(name, model_dir, manifest, encoder, decoder, chat)
    else:
        runner = _encoder_backend(
            chosen,
            model_dir,
            manifest,
            device,
            intra_op_threads,
            torch_dtype,
            half_lane=half_lane,
        )
        preflight(
            model_dir,
            manifest,
            encoder.vocab_size,
            encoder.pad_id,
            runner.input_names,
            registry.check_manifest,
        )
        model = ServedModel(name, model_dir, manifest, encoder, runner)
    loaded = time.perf_counter()
    model.warm_up()
    log.info(
        "model %s ready: task=%s backend=%s device=%s load=%.0fms warm-up=%.0fms",
        name,
        manifest.task.value,
        model.backend_name,
        model.device,
        (loaded - started) * 1000,
        (time.perf_counter() - loaded) * 1000,
    )
    return model
