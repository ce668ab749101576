"""The ONNX conversion itself, through optimum's exporter."""

from __future__ import annotations

import warnings
from pathlib import Path

from sidecar.errors import ExportError
from sidecar.models.manifest import Task


def to_onnx(
    source: Path, out: Path, task: Task, opset: int | None, trust_remote_code: bool
) -> Path:
    """Export the checkpoint's transformer to out/model.onnx (tokenizer and config beside it)."""
    from optimum.exporters.onnx import main_export
    from torch.jit import TracerWarning  # type: ignore[attr-defined]  # exported, not in __all__

    with warnings.catch_warnings():
        # torch's tracer and optimum warn about their own internals (the legacy exporter,
        # traced constants); neither the user nor this code can act on them.
        for category in (DeprecationWarning, FutureWarning, TracerWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        try:
            main_export(
                str(source),
                output=str(out),
                task=task.value,
                # Pooling and normalization stay in the sidecar (numpy): export the bare model.
                library_name="transformers",
                opset=opset,
                device="cpu",
                # export/validate.py checks the exported model through the serving code instead.
                do_validation=False,
                trust_remote_code=trust_remote_code,
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ExportError(f"optimum could not export {source} as {task.value}: {exc}") from exc
    model = out / "model.onnx"
    if not model.is_file():
        written = sorted(p.name for p in out.iterdir())
        raise ExportError(f"optimum wrote no model.onnx for {source} ({written})")
    return model
