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
    """A reduced-precision variant failed its load-time check on this CPU (see :mod:`medsam_rt.core.checks`).

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
    """A precision variant failed its gate (NaN/Inf on extreme inputs, or masks too far from fp32).

    Carries :class:`ParityError`'s attributes (``graph``: ``"<precision> variant"``, ``output``: the metric,
    ``case``: where it failed, ``max_abs_diff``: the metric's measured value, ``tolerance``: its bound's number,
    NaN for "finite") and its own: ``precision``, ``metric``, ``value``, ``bound`` (as text, e.g. ``">= 0.9"``),
    ``where``.
    """

    def __init__(
        self, precision: str, metric: str, value: float, bound: str, where: str, *, limit: float | None = None
    ) -> None:
        self.precision, self.metric, self.value, self.bound, self.where = precision, metric, value, bound, where
        self.graph, self.output, self.case = f"{precision} variant", metric, where
        self.max_abs_diff = float(value)
        self.tolerance = float("nan") if limit is None else float(limit)
        ExportError.__init__(
            self, f"{precision} gate failed: {metric} {value:.4g}, expected {bound}" + (f" ({where})" if where else "")
        )


class OptionSetError(MedSAMError, ValueError):
    """An unknown or inconsistent CUDA option set (:mod:`medsam_rt.core.cuda`)."""


class LabelOverflowError(MedSAMError, ValueError):
    """More masks than a label image can number (65535, uint16)."""


class MaskFormatError(MedSAMError, ValueError):
    """Arrays that are not a valid set of mask crops (e.g. a damaged or foreign ``.npz``)."""


class InvalidSliceError(MedSAMError, ValueError):
    """A slice/frame index or range is outside the volume, or not a valid range."""


class InvalidWindowError(MedSAMError, ValueError):
    """An intensity window is unknown or malformed, or does not apply to this image."""


class SeriesError(MedSAMError, ValueError):
    """A DICOM series cannot be read as one regular volume (several series, a gap, a duplicate, mixed
    orientations or sizes); the message names the files."""


class OutputFormatError(MedSAMError, ValueError):
    """The output path's format cannot hold this result (e.g. a PNG for several slices)."""


class LabelVolumeError(MedSAMError, ValueError):
    """A label volume cannot be written to this path (format) or does not fit the scan."""


class ChallengeError(MedSAMError, ValueError):
    """A challenge folder or case is unusable (missing folder, no case, unreadable npz, missing array)."""


class MetricsError(MedSAMError, ValueError):
    """Predictions and ground truth cannot be compared (missing folder, shapes differ, no ``gts``/``segs``)."""


class UsageError(MedSAMError, ValueError):
    """A command-line argument is unusable."""


class DemoError(MedSAMError, RuntimeError):
    """The demo cannot run (e.g. the model must be exported but the export extras are missing)."""


class MemoryBudgetError(MedSAMError, RuntimeError):
    """A request would need more memory than its budget (``--max-memory``, or a share of the available memory);
    refused before the slow work (see :mod:`medsam_rt.tools.budget`). Attributes: ``needed`` and ``budget`` (bytes)."""

    def __init__(self, message: str, *, needed: int, budget: int) -> None:
        self.needed, self.budget = needed, budget
        super().__init__(message)


# -- the server and the batch / Triton tools --------------------------------------------------------------


class ServeConfigError(MedSAMError, ValueError):
    """A server setting is out of range (the message names it and what it must be)."""


class ServeExtraMissingError(MedSAMError, RuntimeError):
    """FastAPI, uvicorn or python-multipart (the ``serve`` extra) is not installed."""


class ServerStartError(MedSAMError, RuntimeError):
    """The server process exited or did not answer /healthz in time (its output is in the message)."""


class BatchUsageError(MedSAMError, ValueError):
    """A batch run cannot start: bad option, output folder in use or not a folder, engine not installed."""


class BatchError(MedSAMError, RuntimeError):
    """A batch run stopped: the model failed to load in a worker, or the engine itself failed."""


class JobListError(MedSAMError, ValueError):
    """The job list itself is unusable: missing, empty, or two jobs would write the same output."""


class JobError(MedSAMError, ValueError):
    """One job is malformed (reported as that job's failure)."""


class TritonRepositoryError(MedSAMError, ValueError):
    """The repository cannot be written: bad option, existing output, or a graph Triton's config cannot describe."""


__all__ = [
    "BatchError",
    "BatchUsageError",
    "ChallengeError",
    "DemoError",
    "EmbeddingMismatchError",
    "ExportError",
    "GateError",
    "InvalidBoxError",
    "InvalidImageError",
    "InvalidSliceError",
    "InvalidWindowError",
    "JobError",
    "JobListError",
    "LabelOverflowError",
    "LabelVolumeError",
    "MaskFormatError",
    "MedSAMError",
    "MemoryBudgetError",
    "MetricsError",
    "ModelDirError",
    "OptionSetError",
    "OutputFormatError",
    "ParityError",
    "PrecisionCheckError",
    "ProviderUnavailableError",
    "SeriesError",
    "ServeConfigError",
    "ServeExtraMissingError",
    "ServerStartError",
    "TritonRepositoryError",
    "UsageError",
]
