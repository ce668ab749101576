"""The export's own failures, under the sidecar's error tree (the server never raises them).

SidecarError
└── ExportError          a checkpoint cannot be turned into a model dir
    └── ValidationError  the export is not faithful to its reference
"""

from __future__ import annotations

from sidecar.errors import SidecarError


class ExportError(SidecarError):
    """A checkpoint cannot be turned into a model dir."""


class ValidationError(ExportError):
    """The export differs from its reference (PyTorch, or itself batched) beyond tolerance."""
