"""A prompt longer than one prefill chunk is run PREFILL_CHUNK tokens at a time, with the
logits and cache one pass over the whole prompt gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.validate_generation import Graph, as_past
from sidecar.runtime.onnx_decoder import PREFILL_CHUNK, OnnxCausalDecoder
from tests.checkpoints import build_gpt2
from tests.conftest import export_quietly

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2-1200", context=1200)
    return export_quietly(source, tmp_path_factory.mktemp("models") / "gpt2-1200")


def test_a_long_prompt_is_prefilled_in_chunks_as_in_one_pass(long_context_dir: Path) -> None:
    decoder = OnnxCausalDecoder(long_context_dir / "model.onnx", "cpu", 1)
    runs: list[int] = []
    run = decoder._run

    def counted(ids: Any, *rest: Any) -> Any:
        runs.append(int(ids.shape[1]))
        return run(ids, *rest)

    decoder._run = counted  # type: ignore[method-assign]
    ids = [int(i) for i in np.random.default_rng(0).integers(5, 300, 2 * PREFILL_CHUNK + 77)]
    logits, cache = decoder.prefill(ids)
    assert runs == [PREFILL_CHUNK, PREFILL_CHUNK, 77]

    graph = Graph(long_context_dir / "model.onnx")
    n = len(ids)
    whole = graph.run(
        {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            **graph.empty_past(1),
        }
    )
    np.testing.assert_allclose(logits, whole["logits"][0, -1], atol=1e-5)
    assert cache.length == n
    for name, past in as_past(whole).items():
        np.testing.assert_allclose(cache.past[name], past, atol=1e-5)
    # The next step reads that cache like any other.
    step, _ = decoder.step([cache], [int(logits.argmax())])
    assert step.shape == (1, logits.shape[0])
