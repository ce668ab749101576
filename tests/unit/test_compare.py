"""export/compare.py: numpy.allclose's tolerance, and next-token agreement with ties."""

from __future__ import annotations

import numpy as np
import pytest

from export.compare import NextTokens, Tolerance, check_bounds, closeness, refusal
from export.errors import ExportError, ValidationError

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def test_the_allowed_difference_scales_with_the_reference() -> None:
    expected = np.array([0.0, 10.0, -40.0])
    # 40 x 1e-3 + 1e-4 is allowed at -40, only 1e-4 near zero.
    assert closeness(expected + np.array([5e-5, 5e-3, 0.04]), expected, TOL).passed
    found = closeness(expected + np.array([2e-4, 0.0, 0.0]), expected, TOL)
    assert not found.passed
    assert (found.worst_expected, found.worst_diff) == (0.0, pytest.approx(2e-4))
    assert found.tolerance_used == pytest.approx(2.0)
    assert found.max_abs_diff == pytest.approx(2e-4)


def test_nan_and_shape_mismatches_fail() -> None:
    expected = np.ones(3)
    assert not closeness(np.array([1.0, np.nan, 1.0]), expected, TOL).passed
    assert not closeness(np.array([1.0, np.inf, 1.0]), expected, TOL).passed
    with pytest.raises(ValidationError, match=r"shape \[2\] where the reference gives \[3\]"):
        closeness(np.ones(2), expected, TOL)


def test_the_refusal_names_the_numbers_and_the_flags() -> None:
    found = closeness(np.array([1.0]), np.array([0.0]), TOL)
    message = str(refusal("ONNX prefill outputs", found, TOL, (1, 7)))
    assert "ONNX prefill outputs differ from PyTorch by 1.00e+00 at a value of 0" in message
    assert "1.00e-04 is allowed (atol 1e-04, rtol 1e-03), on a batch of 1 x 7 tokens" in message
    assert "raise --atol or --rtol" in message


def test_bounds_must_be_finite_and_not_negative() -> None:
    assert check_bounds(0.0, 0.0) == Tolerance(0.0, 0.0)
    for atol, rtol in ((-1.0, 0.0), (float("nan"), 0.0), (0.0, float("inf"))):
        with pytest.raises(ExportError, match="must be a finite number of 0 or more"):
            check_bounds(atol, rtol)


def test_next_tokens_agree_or_tie() -> None:
    tokens = NextTokens()
    expected = np.array([[1.0, 5.0, 2.0, 0.0, -1.0, 3.0], [0.0, 1.0, 2.0, 3.0, 4.0, 2.00001]])
    tokens.add(expected.copy(), expected, "prefill")
    assert tokens.record()["top1_agreement"] == 1.0
    tied = np.array([[0.0, 2.0, 2.0 + 1e-5, -1.0, -2.0, -3.0]])
    flipped = tied.copy()
    flipped[0, 1] += 2e-5  # rounding may break a tie either way
    tokens.add(flipped, tied, "cached step")
    record = tokens.record()
    assert (record["positions"], record["top1_ties"]) == (3, 1)
    assert record["top1_agreement"] == pytest.approx(2 / 3)


def test_a_different_next_token_fails() -> None:
    expected = np.array([[0.0, 3.0, 1.0, 0.5, 0.2, 0.1]])
    actual = np.array([[0.0, 1.0, 3.0, 0.5, 0.2, 0.1]])
    with pytest.raises(ValidationError, match=r"picks token 2 where PyTorch picks 1"):
        NextTokens().add(actual, expected, "prefill")


def test_a_different_top_k_fails_but_a_boundary_tie_does_not() -> None:
    expected = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 1.0, 0.0]])
    swapped = expected.copy()
    swapped[0, 4], swapped[0, 6] = 0.0, 5.0  # token 6 enters the top 5, far below the 5th
    with pytest.raises(ValidationError, match=r"top 5 tokens \[0, 1, 2, 3, 6\] differ"):
        NextTokens().add(swapped, expected, "prefill")
    close = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 5.0 - 1e-5, 0.0]])
    nudged = close.copy()
    nudged[0, 5] += 2e-5
    tokens = NextTokens()
    tokens.add(nudged, close, "prefill")
    assert tokens.record()["topk_overlap_min"] == pytest.approx(0.8)


def test_a_loosened_bound_on_values_still_refuses_a_changed_choice() -> None:
    expected = np.array([[0.0, 3.0, 2.9, 0.5, 0.2, 0.1]])
    actual = np.array([[0.0, 2.9, 3.0, 0.5, 0.2, 0.1]])
    loose = Tolerance(atol=0.5, rtol=0.0)
    assert closeness(actual, expected, loose).passed
    # 0.1 apart is no tie at the default tolerance, which the token check keeps.
    with pytest.raises(ValidationError, match=r"picks token 2 where PyTorch picks 1"):
        NextTokens().add(actual, expected, "prefill")


def test_equal_values_pass_even_without_any_room() -> None:
    exact = Tolerance(atol=0.0, rtol=0.0)
    values = np.array([0.0, -np.inf, 3.0, np.inf])
    found = closeness(values.copy(), values, exact)
    assert (found.passed, found.tolerance_used, found.max_abs_diff) == (True, 0.0, 0.0)
    assert not closeness(values + np.array([0, 0, 1e-9, 0]), values, exact).passed


def test_the_worst_value_is_found_in_any_block_of_rows() -> None:
    expected = np.zeros((300, 10))
    actual = expected.copy()
    actual[5, 1] = 5e-5
    actual[250, 7] = 3e-4  # past the first blocks
    found = closeness(actual, expected, TOL)
    assert (found.passed, found.max_abs_diff) == (False, pytest.approx(3e-4))
    assert found.tolerance_used == pytest.approx(3.0)
    tokens = NextTokens()
    tokens.add(expected + np.arange(10), expected + np.arange(10), "prefill")
    assert tokens.record()["positions"] == 300
