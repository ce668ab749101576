"""How close an exported graph's outputs are to a reference.

Outputs are compared as numpy.allclose compares them: each value may differ by
atol + rtol x |reference value|, so large logits of a real model get room in proportion
while values near zero keep the absolute bound. A language model's next-token choice is
checked at every compared position too: the top-1 token, and the top-k set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from export.errors import ExportError, ValidationError

# Measured on SmolLM2-135M (fp32, 30 layers): |ONNX - PyTorch| stayed below 9e-5 on logits up
# to 41 over prompts of 16 to 2,048 tokens and at positions up to 8,191, which these bounds
# pass with half of their room unused; tiny random models differ by 1e-6. A cache or mask
# wired wrongly differs by 0.1 to 2 and fails by orders of magnitude.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# Inputs run through both models are cut to this many tokens. Measured on SmolLM2-135M here:
# a 1,024-token prefill took 1.7 s in PyTorch and 2.8 s in ONNX Runtime, where the full
# 8,191-token context took over 4 minutes and 20 GB; the difference did not grow with length
# (7e-5 at 16 tokens and at 2,048).
VALIDATED_TOKENS = 1024
# Next-token sets compared per position.
TOP_K = 5
# Said with a changed choice: the one refusal no tolerance flag lifts.
_CHOICES = " (a model's choices may differ only at ties; --atol and --rtol do not change that)"
# Rows of logits compared at once, to bound the temporaries.
_ROWS = 64


@dataclass(frozen=True)
class Tolerance:
    """The allowed difference: atol + rtol x |reference|, element by element."""

    atol: float
    rtol: float

    def describe(self) -> str:
        """The bounds as the CLI flags name them."""
        return f"atol {self.atol:.0e}, rtol {self.rtol:.0e}"

    def allowed(self, expected: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """The largest allowed difference at each reference value."""
        return self.atol + self.rtol * np.abs(expected.astype(np.float64))


# Scores this close count as a tie in the next-token check, whatever --atol and --rtol say.
TIE = Tolerance(DEFAULT_ATOL, DEFAULT_RTOL)


def check_bounds(atol: float, rtol: float) -> Tolerance:
    """A Tolerance from the CLI's values; refuses a negative or non-finite one."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        # `not value >= 0` is true for NaN too.
        if not value >= 0 or value == float("inf"):
            raise ExportError(f"{flag} must be a finite number of 0 or more, not {value}")
    return Tolerance(atol, rtol)


@dataclass(frozen=True)
class Closeness:
    """How far one output was from its reference."""

    max_abs_diff: float
    # The largest |difference| / allowed difference: at most 1 passes.
    tolerance_used: float
    # The reference value and the difference where tolerance_used peaked.
    worst_expected: float
    worst_diff: float

    @property
    def passed(self) -> bool:
        """Whether every value was within its allowed difference."""
        # `x <= 1` is false for NaN: a NaN always fails.
        return bool(self.tolerance_used <= 1.0)


def _rows(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The array as rows of its last axis (a scalar as one row of one)."""
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def closeness(actual: npt.NDArray[Any], expected: npt.NDArray[Any], tol: Tolerance) -> Closeness:
    """Element-wise comparison of two arrays of one shape, _ROWS rows at a time (the logits of
    a long prompt over a large vocabulary run to gigabytes)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise ValidationError(
            f"the exported graph gives outputs of shape {list(actual.shape)} where the "
            f"reference gives {list(expected.shape)}: the export is not faithful"
        )
    if actual.size == 0:
        return Closeness(0.0, 0.0, 0.0, 0.0)
    ours, theirs = _rows(actual), _rows(expected)
    largest, found = 0.0, Closeness(0.0, 0.0, 0.0, 0.0)
    for start in range(0, len(ours), _ROWS):
        a = ours[start : start + _ROWS].astype(np.float64)
        e = theirs[start : start + _ROWS].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Equal values differ by nothing, infinities and atol 0 included (as allclose).
            diff = np.where(a == e, 0.0, np.abs(a - e))
            ratio = np.where(diff == 0, 0.0, diff / tol.allowed(e))
        nan = np.isnan(ratio)
        if nan.any():  # NaN in either array fails the comparison, and says where
            at = int(np.argmax(nan))
            return Closeness(float("nan"), float("nan"), float(e.flat[at]), float("nan"))
        largest = max(largest, float(diff.max()))
        at = int(np.argmax(ratio))
        if ratio.flat[at] > found.tolerance_used:
            found = Closeness(0.0, float(ratio.flat[at]), float(e.flat[at]), float(diff.flat[at]))
    return Closeness(largest, found.tolerance_used, found.worst_expected, found.worst_diff)


def refusal(
    what: str,
    found: Closeness,
    tol: Tolerance,
    shape: tuple[int, ...],
    reference: str = "PyTorch",
) -> ValidationError:
    """The error for a comparison that failed, with the numbers and what the user can do."""
    allowed = tol.atol + tol.rtol * abs(found.worst_expected)
    where = " x ".join(str(d) for d in shape)
    return ValidationError(
        f"{what} differ from {reference} by {found.worst_diff:.2e} at a value of "
        f"{found.worst_expected:.3g}, where {allowed:.2e} is allowed ({tol.describe()}), on a "
        f"batch of {where} tokens: the export is not faithful (if that difference is "
        "acceptable for this model, raise --atol or --rtol)"
    )


@dataclass
class NextTokens:
    """Next-token agreement over every compared position of a language model.

    A choice may differ only between tokens the reference scores within TIE of each other:
    a tie that rounding may break either way. TIE stays at the default tolerance whatever
    --atol and --rtol say, so loosening the bound on values never lets the model's choices
    change.
    """

    positions: int = 0
    top1_equal: int = 0
    top1_ties: int = 0
    topk_overlap_min: float = 1.0
    _overlap_sum: float = 0.0

    def add(
        self,
        actual: npt.NDArray[Any],
        expected: npt.NDArray[Any],
        stage: str,
        reference: str = "PyTorch",
    ) -> None:
        """Compare logits [positions, vocab]; ValidationError where the choice differs."""
        ours_all, theirs_all = _rows(np.asarray(actual)), _rows(np.asarray(expected))
        for start in range(0, len(ours_all), _ROWS):
            ours = ours_all[start : start + _ROWS].astype(np.float32)
            theirs = theirs_all[start : start + _ROWS].astype(np.float32)
            self._block(ours, theirs, start, stage, reference)

    def _block(
        self,
        actual: npt.NDArray[np.float32],
        expected: npt.NDArray[np.float32],
        first: int,
        stage: str,
        reference: str,
    ) -> None:
        k = min(TOP_K, expected.shape[-1])
        rows = np.arange(len(expected))
        ours, theirs = actual.argmax(-1), expected.argmax(-1)
        # How far below the reference's best a token may score and still tie with it.
        room = TIE.allowed(expected[rows, theirs]) * 2
        gap = expected[rows, theirs].astype(np.float64) - expected[rows, ours]
        differ = ours != theirs
        wrong = differ & ~(gap <= room)
        if wrong.any():
            at = int(np.argmax(wrong))
            raise ValidationError(
                f"at {stage} position {first + at} the exported graph picks token "
                f"{int(ours[at])} where {reference} picks {int(theirs[at])} ({reference} "
                f"scores them {gap[at]:.3g} apart): the export is not faithful{_CHOICES}"
            )
        top_ours = np.argpartition(-actual, k - 1, axis=-1)[:, :k]
        top_theirs = np.argpartition(-expected, k - 1, axis=-1)[:, :k]
        kth = np.take_along_axis(expected, top_theirs, -1).min(-1).astype(np.float64)
        for row in rows:
            extra = np.setdiff1d(top_ours[row], top_theirs[row])
            # A token only the graph ranks top-k must tie with the reference's k-th.
            if np.any(expected[row, extra] < kth[row] - room[row]):
                raise ValidationError(
                    f"at {stage} position {first + int(row)} the exported graph's top {k} "
                    f"tokens {sorted(int(t) for t in top_ours[row])} differ from "
                    f"{reference}'s {sorted(int(t) for t in top_theirs[row])}: the export is "
                    f"not faithful{_CHOICES}"
                )
            overlap = 1 - len(extra) / k
            self.topk_overlap_min = min(self.topk_overlap_min, overlap)
            self._overlap_sum += overlap
        self.positions += len(rows)
        self.top1_equal += int(np.sum(~differ))
        self.top1_ties += int(np.sum(differ))

    def record(self) -> dict[str, Any]:
        """The manifest's `next_token` object."""
        return {
            "positions": self.positions,
            "top1_agreement": self.top1_equal / self.positions if self.positions else 1.0,
            "top1_ties": self.top1_ties,
            "top_k": TOP_K,
            "topk_overlap_min": self.topk_overlap_min,
            "topk_overlap_mean": self._overlap_sum / self.positions if self.positions else 1.0,
        }
