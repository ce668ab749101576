"""Scores over (text, text) pairs: cross-encoder reranking and NLI zero-shot classification."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sidecar.errors import InvalidInputError

DEFAULT_TEMPLATE = "This example is {}."
MAX_TEMPLATE_CHARS = 1000


def sigmoid(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Relevance in [0, 1] from a cross-encoder's single logit."""
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return result


def entailment_id(labels: Sequence[str]) -> int:
    """The NLI label meaning entailment (-1 when there is none), found as transformers does."""
    return next((i for i, label in enumerate(labels) if label.lower().startswith("entail")), -1)


def hypotheses(template: str, candidates: Sequence[str]) -> list[str]:
    """The hypothesis for each candidate label: the template's one plain {} replaced."""
    template = template or DEFAULT_TEMPLATE
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidInputError(
            f"hypothesis_template is {len(template)} characters; at most {MAX_TEMPLATE_CHARS}"
        )
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        fields = [("invalid", str(exc), None)]
    # Only a bare {} or {0}: a width or an attribute would let a short request build huge
    # strings or read the label's attributes.
    if len(fields) != 1 or fields[0] not in (("", "", None), ("0", "", None)):
        raise InvalidInputError(
            f"hypothesis_template {template!r} must hold exactly one {{}} where the label goes "
            "(no other braces, names, formats or conversions; write {{ and }} for braces)"
        )
    return [template.format(label) for label in candidates]


def zero_shot(
    logits: npt.NDArray[np.float32], entail: int, *, multi_label: bool
) -> npt.NDArray[np.float32]:
    """Each candidate's probability from its NLI logits ([candidates, nli labels]).

    One distribution over the candidates' entailment logits, or with `multi_label` (or a
    single candidate) entailment against contradiction for each candidate on its own.
    """
    if multi_label or len(logits) == 1:
        contradiction = -1 if entail == 0 else 0
        pair = logits[:, [contradiction, entail]]
        weights = np.exp(pair - pair.max(axis=1, keepdims=True))
        result: npt.NDArray[np.float32] = (weights / weights.sum(axis=1, keepdims=True))[:, 1]
        return result
    scores = logits[:, entail]
    weights = np.exp(scores - scores.max())
    normalized: npt.NDArray[np.float32] = weights / weights.sum()
    return normalized
