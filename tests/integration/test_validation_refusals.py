"""Validation still refuses what is broken, with bounds that real models pass: a decoder graph
that ignores its attention mask, one whose cache is wired wrongly, one that drops a present
output, a Gemma graph without position ids; and the sidecar batches such a graph safely."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from export import checkpoint, validate_generation
from export.compare import DEFAULT_ATOL, DEFAULT_RTOL, VALIDATED_TOKENS, Tolerance
from export.errors import ValidationError
from sidecar.models.manifest import Task
from sidecar.runtime.onnx_decoder import OnnxCausalDecoder
from tests.checkpoints import build_gemma
from tests.graph_surgery import broken_copy, drop_output, ignore_input, swap_inputs

pytestmark = pytest.mark.slow
TOL = Tolerance(DEFAULT_ATOL, DEFAULT_RTOL)


def check(source: Path, model_dir: Path) -> dict[str, object]:
    info = checkpoint.inspect(source, Task.GENERATE)
    return validate_generation.validate(
        source, model_dir, info, TOL, VALIDATED_TOKENS, trust_remote_code=False
    )


def test_the_intact_graph_passes(gpt2_source: Path, gpt2_dir: Path) -> None:
    assert check(gpt2_source, gpt2_dir)["tolerance_used"] <= 1  # type: ignore[operator]


def test_a_graph_ignoring_its_attention_mask_is_refused(
    gpt2_source: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    broken = broken_copy(
        gpt2_dir, tmp_path / "no-mask", "model.onnx", lambda m: ignore_input(m, "attention_mask")
    )
    # Alone, every row is all ones anyway: only the padded batched step shows it.
    with pytest.raises(ValidationError, match=r"ONNX batched cached step outputs differ"):
        check(gpt2_source, broken)


def test_a_cache_wired_wrongly_is_refused(
    gpt2_source: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    keys, values = "past_key_values.0.key", "past_key_values.0.value"
    broken = broken_copy(
        gpt2_dir, tmp_path / "swapped", "model.onnx", lambda m: swap_inputs(m, keys, values)
    )
    # The prefill has an empty past and passes; the first cached step does not.
    with pytest.raises(ValidationError, match=r"ONNX cached step outputs differ"):
        check(gpt2_source, broken)


def test_a_dropped_present_output_is_refused(
    gpt2_source: Path, gpt2_dir: Path, tmp_path: Path
) -> None:
    broken = broken_copy(
        gpt2_dir, tmp_path / "dropped", "model.onnx", lambda m: drop_output(m, "present.1.value")
    )
    with pytest.raises(ValidationError, match=r"returns no present\.1\.value"):
        check(gpt2_source, broken)


@pytest.fixture(scope="module")
def gemma_without_positions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Gemma as optimum exports it unaided: no position_ids input."""
    from optimum.exporters.onnx import main_export

    source = build_gemma(tmp_path_factory.mktemp("ckpt") / "gemma")
    out = tmp_path_factory.mktemp("models") / "gemma-raw"
    with warnings.catch_warnings():  # the tracer's own deprecations, as export/convert.py
        warnings.simplefilter("ignore")
        main_export(
            str(source),
            output=str(out),
            task="text-generation-with-past",
            library_name="transformers",
            device="cpu",
            do_validation=False,
        )
    return source, out


def test_a_gemma_graph_without_position_ids_is_refused(
    gemma_without_positions: tuple[Path, Path],
) -> None:
    source, raw = gemma_without_positions
    assert not validate_generation.Graph(raw / "model.onnx").takes_positions
    with pytest.raises(ValidationError, match=r"ONNX batched cached step outputs differ"):
        check(source, raw)


def test_a_graph_without_position_ids_is_batched_by_length(
    gemma_without_positions: tuple[Path, Path],
) -> None:
    _, raw = gemma_without_positions
    decoder = OnnxCausalDecoder(raw / "model.onnx", "cpu", 1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16], [20, 21]]
    caches, tokens = [], []
    for ids in prompts:
        logits, cache = decoder.prefill(ids)
        caches.append(cache)
        tokens.append(int(logits.argmax()))
    together, stepped = decoder.step(caches, tokens)
    for row, (cache, token) in enumerate(zip(caches, tokens, strict=True)):
        alone, (own,) = decoder.step([cache], [token])
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)
        assert stepped[row].length == own.length == len(prompts[row]) + 1
