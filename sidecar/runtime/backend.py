"""The protocol every inference backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt

Arrays = Mapping[str, npt.NDArray[np.generic]]


class Backend(Protocol):
    """Runs a model's forward pass on named numpy inputs. Called from executor threads."""

    name: str  # "onnx" or "torch"
    device: str  # "cpu" or "cuda:<index>"
    input_names: tuple[str, ...]

    def run(self, inputs: Arrays) -> dict[str, npt.NDArray[np.float32]]:
        """One forward pass; returns the model's outputs by name."""
        ...
