"""Pooling, normalization and label scoring against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.tasks.classify import probabilities, ranked
from sidecar.tasks.embed import normalize, pool

HIDDEN = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) - 5  # [batch, seq, dim]
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)  # second row has one pad token


def test_mean_ignores_padding() -> None:
    expected = np.stack([HIDDEN[0].mean(axis=0), HIDDEN[1, :2].mean(axis=0)])
    np.testing.assert_allclose(pool(HIDDEN, MASK, "mean"), expected)


def test_mean_sqrt_len() -> None:
    expected = np.stack(
        [HIDDEN[0].sum(axis=0) / np.sqrt(3), HIDDEN[1, :2].sum(axis=0) / np.sqrt(2)]
    )
    np.testing.assert_allclose(pool(HIDDEN, MASK, "mean_sqrt_len"), expected, rtol=1e-6)


def test_max_never_picks_padding() -> None:
    hidden = HIDDEN.copy()
    hidden[1, 2] = 1000  # a pad position with a huge value
    expected = np.stack([hidden[0].max(axis=0), hidden[1, :2].max(axis=0)])
    np.testing.assert_allclose(pool(hidden, MASK, "max"), expected)


def test_nan_at_padded_positions_never_leaks() -> None:
    hidden = HIDDEN.copy()
    hidden[1, 2] = np.nan  # some exported attention paths leave NaN where the mask is 0
    for mode in ("mean", "mean_sqrt_len", "max", "lasttoken", "cls"):
        assert np.isfinite(pool(hidden, MASK, mode)).all(), mode


def test_cls_and_last_token() -> None:
    np.testing.assert_allclose(pool(HIDDEN, MASK, "cls"), HIDDEN[:, 0])
    np.testing.assert_allclose(
        pool(HIDDEN, MASK, "lasttoken"), np.stack([HIDDEN[0, 2], HIDDEN[1, 1]])
    )


def test_unknown_pooling() -> None:
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        pool(HIDDEN, MASK, "sum")


def test_normalize_unit_rows_and_zero_rows() -> None:
    vectors = np.array([[3, 4], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(normalize(vectors), [[0.6, 0.8], [0, 0]])


def test_softmax_is_stable_and_sums_to_one() -> None:
    logits = np.array([[1000.0, 1001.0, 999.0]], dtype=np.float32)
    probs = probabilities(logits, multi_label=False)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, np.exp([[0, 1, -1]]) / np.exp([[0, 1, -1]]).sum(), rtol=1e-5)


def test_sigmoid_for_multi_label() -> None:
    probs = probabilities(np.array([[0.0, 2.0, -2.0]], dtype=np.float32), multi_label=True)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.array([[0.0, 2.0, -2.0]]))), rtol=1e-6)


def test_ranked_sorts_and_cuts() -> None:
    scores = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    assert [s.label for s in ranked(scores, ["a", "b", "c"], 0)] == ["b", "c", "a"]
    top = ranked(scores, ["a", "b", "c"], 2)
    assert [(s.label, s.id) for s in top] == [("b", 1), ("c", 2)]
