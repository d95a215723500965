"""Typed errors raised by medsam-rt.

Every error a user can cause is a subclass of :class:`MedSAMError` *and* of
``ValueError`` (bad input) or ``RuntimeError`` (environment), so callers can
catch them either way. Messages name the offending value and what was expected.
"""

from __future__ import annotations


class MedSAMError(Exception):
    """Base class of every error medsam-rt raises on purpose."""


class InvalidImageError(MedSAMError, ValueError):
    """The image is unreadable, empty, of an unsupported shape/dtype or holds NaN/Inf."""


class InvalidBoxError(MedSAMError, ValueError):
    """A box is malformed: wrong shape, NaN/Inf, inverted, zero-area or outside the image."""


class ModelDirError(MedSAMError, ValueError):
    """A model directory is missing files, has an unknown manifest or inconsistent graphs."""


class PrecisionCheckError(ModelDirError):
    """A reduced-precision variant failed its load-time check on this CPU (see :mod:`medsam_rt.checks`).

    Attributes: ``precision``, ``metric`` (what was compared), ``value`` and ``bound`` (what it had to meet).
    """

    def __init__(self, message: str, *, precision: str, metric: str, value: object, bound: str) -> None:
        self.precision, self.metric, self.value, self.bound = precision, metric, value, bound
        super().__init__(message)


class EmbeddingMismatchError(MedSAMError, ValueError):
    """An :class:`ImageEmbedding` was made by another model than the one asked to decode it."""


class ProviderUnavailableError(MedSAMError, RuntimeError):
    """The requested device has no ONNX Runtime execution provider on this host."""


class ExportError(MedSAMError, RuntimeError):
    """Export failed: the source model cannot be loaded or converted."""


class ParityError(ExportError):
    """An exported graph disagrees with PyTorch beyond tolerance; nothing was written."""

    def __init__(self, graph: str, output: str, case: str, max_abs_diff: float, tolerance: float) -> None:
        self.graph = graph
        self.output = output
        self.case = case
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(
            f"parity check failed for {graph} output '{output}' ({case}): "
            f"max abs diff {max_abs_diff:.3g} > tolerance {tolerance:.3g}"
        )


class GateError(ParityError):
    """A precision variant failed its gate (NaN/Inf on extreme inputs, or masks too far from fp32)."""

    def __init__(self, precision: str, metric: str, value: float, bound: str, where: str) -> None:
        self.precision, self.metric, self.value, self.bound, self.where = precision, metric, value, bound, where
        ExportError.__init__(
            self, f"{precision} gate failed: {metric} {value:.4g}, expected {bound}" + (f" ({where})" if where else "")
        )
