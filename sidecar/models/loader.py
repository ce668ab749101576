"""Turning a configured model dir into a ServedModel: verify, preflight, load, warm up."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sidecar.models.manifest import Manifest, verify_files
from sidecar.models.preflight import preflight
from sidecar.models.served import ServedModel
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks.tokenization import TextEncoder

log = logging.getLogger(__name__)


def load_model(
    name: str,
    model_dir: Path,
    manifest: Manifest,
    device: str,
    intra_op_threads: int,
    verify_checksums: bool = True,
) -> ServedModel:
    """Load one model dir; raises ModelLoadError (or ConfigError) naming what is wrong."""
    started = time.perf_counter()
    if verify_checksums:
        verify_files(model_dir, manifest)
    encoder = TextEncoder(model_dir, manifest.max_length)
    backend = OnnxBackend(model_dir / manifest.onnx_file, device, intra_op_threads)
    preflight(model_dir, manifest, encoder.vocab_size, encoder.pad_id, backend.input_names)
    model = ServedModel(name, model_dir, manifest, encoder, backend)
    loaded = time.perf_counter()
    model.warm_up()
    log.info(
        "model %s ready: task=%s backend=%s device=%s load=%.0fms warm-up=%.0fms",
        name,
        manifest.task.value,
        backend.name,
        backend.device,
        (loaded - started) * 1000,
        (time.perf_counter() - loaded) * 1000,
    )
    return model
