"""Know the cost before paying it: the peak memory of a segmentation request, estimated before the slow work.

A request's resident memory goes through phases (each includes what the earlier ones left behind):

- ``read``: the decoded image, plus the decoder's own buffer while it is copied out (Pillow holds RGB as 4 bytes
  per pixel);
- ``embed``: the model's sessions, the image, its 8-bit display copy (non-8-bit sources), the intake and resize
  temporaries of :mod:`medsam_rt.core.preprocess` (bounded bands, not full-size float copies), and the encoder's
  working memory (ONNX Runtime's arena, kept after the run);
- ``decode``: low-resolution logits (``N x 256 x 256`` float32, held until the masks are written), the decoder's
  working memory for one call of up to 16 boxes, and the masks as crops (estimated from the boxes' areas: a mask
  seldom leaves its box; a random-weight model's masks do, so this underestimates them);
- ``write``: the output: a label image (``.png``: ``H x W`` of 1 or 2 bytes and the encoder's copy; NIfTI: the
  volume, its bytes and the gzip), the crops concatenated (``.npz``), one dense mask (``.npy``); ``--overlay``
  adds float32 RGB of the image and the side-by-side figure.

:func:`estimate_segment` returns a :class:`MemoryEstimate` (bytes per part and phase, the peak); :func:`check`
raises :class:`~medsam_rt.errors.MemoryBudgetError` above a budget (default: :func:`default_budget`, a fraction
of the memory available to this process: ``MemAvailable`` of ``/proc/meminfo`` and the cgroup's limit less its
usage, whichever is smaller). The model terms are measured constants (see docs/large-images.md: LiteMedSAM and
the tiny test model on this project's CPU machines; ViT-B from its recorded encoder peak); estimates were checked
against measured peak RSS (tests/test_budget.py).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam_rt.errors import MemoryBudgetError, UsageError

MiB = 1 << 20
GiB = 1 << 30

#: The share of the available memory a request may use by default.
DEFAULT_FRACTION = 0.8
#: Python, numpy, ONNX Runtime, Pillow and medsam-rt imported (measured: 55-70 MiB).
BASE_BYTES = 80 * MiB
#: ONNX Runtime sessions hold about this many times the graph files' bytes (measured 1.7x on LiteMedSAM).
SESSION_FACTOR = 1.7
#: Boxes per decoder call (:meth:`medsam_rt.MedSAM.segment` decodes at most 16 at once).
DECODER_BATCH = 16
#: Low-resolution logits per box: float32 256 x 256.
LOGITS_BYTES = 256 * 256 * 4

#: Encoder working memory (ONNX Runtime arena after one run) and decoder working memory per box in a call, by
#: model: measured peak-RSS increments (LiteMedSAM fp32 on a 2-core Xeon: +290 MiB, +30 MiB per box; the tiny
#: random model: +445 MiB, +5 MiB per box; MedSAM ViT-B: 1.6 GB encoder peak recorded with its 342 MiB weights).
MODEL_WORK: dict[str, tuple[int, int]] = {
    "litemedsam": (300 * MiB, 32 * MiB),
    "tiny": (460 * MiB, 6 * MiB),
    "vit-b": (1100 * MiB, 32 * MiB),
}
#: Unknown models: by encoder input size (SAM's 256-channel decoder per box).
_WORK_BY_INPUT = {256: (300 * MiB, 32 * MiB), 1024: (1100 * MiB, 32 * MiB)}


@dataclass(frozen=True)
class ModelCost:
    """What a model costs whatever the image: its sessions and working memory.

    Attributes:
        name: the model's kind (for messages).
        sessions: bytes of its loaded graphs.
        encoder_work: encoder working memory (kept after the first run).
        decoder_per_box: decoder working memory per box of one call.
    """

    name: str
    sessions: int
    encoder_work: int
    decoder_per_box: int

    @classmethod
    def of(cls, manifest: Any, precision: str = "auto", device: str = "cpu") -> ModelCost:
        """The cost of a model directory's graphs (its loaded :class:`~medsam_rt.core.manifest.Manifest`) at
        ``precision`` (resolved as :meth:`medsam_rt.MedSAM.load` does).

        Raises:
            ModelDirError: the precision was not exported.
        """
        chosen = manifest.choose_precision(precision, device)
        graph_bytes = sum(manifest.graph(role, chosen).size for role in ("encoder", "decoder"))
        model = manifest.raw.get("model", {})
        kind, arch = str(model.get("kind", "")), str(model.get("arch", "")).lower()
        key = "litemedsam" if kind == "litemedsam" else "tiny" if arch == "tiny" else "vit-b" if "vit" in arch else ""
        pad = max(manifest.preprocessing.pad_size)
        enc, per_box = MODEL_WORK.get(key) or _WORK_BY_INPUT.get(pad, _WORK_BY_INPUT[1024])
        return cls(key or kind or "model", int(graph_bytes * SESSION_FACTOR), enc, per_box)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated resident memory of one request.

    Attributes:
        parts: bytes per named part (``image``, ``masks``, ``label image``, ...).
        phases: bytes resident at each phase's peak (``read``, ``embed``, ``decode``, ``write``), in order.
        peak: the largest phase, bytes.
        phase: the phase that peaks.
    """

    parts: dict[str, int]
    phases: dict[str, int]
    peak: int = field(init=False)
    phase: str = field(init=False)

    def __post_init__(self) -> None:
        phase = max(self.phases, key=lambda k: self.phases[k])
        object.__setattr__(self, "phase", phase)
        object.__setattr__(self, "peak", int(self.phases[phase]))

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` largest parts, largest first."""
        return sorted(self.parts.items(), key=lambda kv: -kv[1])[:n]

    def describe(self) -> str:
        """One line: the peak, its phase and the largest parts."""
        parts = ", ".join(f"{name} {format_size(b)}" for name, b in self.largest(4) if b)
        return f"{format_size(self.peak)} at its peak ({self.phase}: {parts})"


def parse_size(text: str | int) -> int:
    """``"2G"``, ``"1.5GiB"``, ``"500M"``, ``"800MB"``, ``"123456"`` (bytes) -> bytes; powers of 1024.

    Raises:
        UsageError: not a positive size.
    """
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if m is None:
            raise UsageError(f"memory size {text!r} is not a size; expected e.g. 2G, 1.5GiB, 800M or a byte count")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[unit])
    if size <= 0:
        raise UsageError(f"memory size {text!r} must be positive")
    return size


def format_size(n: int) -> str:
    """Bytes as ``"1.85 GiB"`` / ``"312 MiB"``."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes() -> int:
    """Memory this process can still take: ``MemAvailable`` (``/proc/meminfo``), capped by the cgroup's limit
    less its current usage (cgroup v2 ``memory.max``/``memory.current``, or v1's files); ``os.sysconf`` where
    neither is readable."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            avail = min(avail, max(0, limit - usage))
    return int(avail)


def current_rss(pid: int | str = "self") -> int:
    """The resident set size now of this process (or of process ``pid``), in bytes; 0 where ``/proc`` is not
    readable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_budget(fraction: float = DEFAULT_FRACTION) -> int:
    """What this process holds now plus ``fraction`` of :func:`available_bytes` (the budget for its peak RSS)."""
    return current_rss() + int(fraction * available_bytes())


def _box_areas(boxes: np.ndarray, image_size: tuple[int, int]) -> int:
    """Pixels of the boxes' crops: each box widened to whole pixels and clipped to the image."""
    if boxes.size == 0:
        return 0
    h, w = image_size
    x0 = np.clip(np.floor(boxes[:, 0]), 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, h)
    x1 = np.clip(np.ceil(boxes[:, 2]), 0, w)
    y1 = np.clip(np.ceil(boxes[:, 3]), 0, h)
    return int(((x1 - x0) * (y1 - y0)).sum())


def _resize_work(image_size: tuple[int, int], resized: tuple[int, int], interpolation: str, contiguous: bool) -> int:
    """Temporaries of :func:`medsam_rt.core.preprocess.resize_uint8` for one channel (see its docstring)."""
    (h, w), (oh, ow) = image_size, resized
    if interpolation == "area":
        strip = min(64 * MiB, 8 * h * w)
        return strip + 8 * min(oh * w, h * ow)
    copy = 0 if contiguous else h * w
    return copy + h * w + h * ow  # the channel's copy, Pillow's image, its horizontal pass


def estimate_segment(
    image_size: tuple[int, int],
    boxes: np.ndarray | Sequence[np.ndarray],
    model: ModelCost,
    preprocessing: Any,
    *,
    dtype: Any = np.uint8,
    channels: int = 1,
    slices: int = 1,
    output: str = ".npz",
    display: bool | None = None,
    overlay: bool = False,
    decoded: bool = True,
) -> MemoryEstimate:
    """Estimate the peak RSS of segmenting one image (or some slices of a volume) and writing the result.

    Args:
        image_size: ``(H, W)`` of the image (of one slice).
        boxes: ``(N, 4)`` x0, y0, x1, y1 in pixels, or one such array per segmented slice.
        model: :class:`ModelCost`.
        preprocessing: the model's :class:`~medsam_rt.core.preprocess.Preprocessing`.
        dtype, channels, slices: the decoded source (``slices`` of ``H x W x channels`` values of ``dtype``).
        output: the output's suffix (``.png``, ``.npz``, ``.npy``, ``.nii``, ``.nii.gz``).
        display: an 8-bit display copy of each slice is made (default: for non-uint8 grayscale).
        overlay: an overlay figure is written too.
        decoded: the image is decoded from a file in this process (the ``read`` phase counts the decoder's copy).

    Returns:
        :class:`MemoryEstimate` (bytes).
    """
    from medsam_rt.core.preprocess import resized_shape

    dtype = np.dtype(dtype)
    h, w = (int(v) for v in image_size)
    plane = h * w
    image = slices * plane * channels * dtype.itemsize
    boxes = [boxes] if isinstance(boxes, np.ndarray) else boxes
    per_slice = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
    n_max = max((len(b) for b in per_slice), default=0)
    n_all = sum(len(b) for b in per_slice)
    if display is None:
        display = channels == 1 and dtype != np.uint8
    display_bytes = plane if display else 0
    display_work = min(16 * plane, 128 * MiB) if display else 0  # medical.window: float64 temporaries (blocks)
    as_uint8 = dtype == np.uint8 or display
    intake = 0 if channels in (1, 3) and as_uint8 else plane * 3 if channels >= 3 else plane
    resized = resized_shape((h, w), preprocessing)
    resize = _resize_work((h, w), resized, preprocessing.interpolation, contiguous=channels == 1)
    pixel_values = 3 * preprocessing.pad_size[0] * preprocessing.pad_size[1] * 4
    logits = n_all * LOGITS_BYTES
    masks = sum(_box_areas(b, (h, w)) for b in per_slice)
    decoder_work = min(n_max, DECODER_BATCH) * model.decoder_per_box
    label_bytes = plane * (1 if n_max <= 255 else 2)
    if output == ".png":
        out = 2 * label_bytes
    elif output in (".nii", ".nii.gz"):
        volume = label_bytes * (slices if slices > 1 else 1)
        out = volume * (3 if output == ".nii.gz" else 2)
    elif output == ".npy":
        out = plane
    else:
        out = masks
    figure = (plane * 3 * 4 + plane * 2 * 3 * 2) if overlay else 0  # float32 blend + uint8 figure and its copy
    decoder_copy = 0 if not decoded else plane * channels * dtype.itemsize * (4 / 3 if channels == 3 else 1)
    parts = {
        "process": BASE_BYTES,
        "image": image,
        "decoding copy": int(decoder_copy),
        "model sessions": model.sessions,
        "display copy": display_bytes,
        "display conversion": display_work,
        "intake": intake,
        "resize": resize,
        "encoder input": pixel_values,
        "encoder": model.encoder_work,
        "decoder": decoder_work,
        "low-res logits": logits,
        "masks": masks,
        "output": out,
        "overlay": figure,
    }
    held = BASE_BYTES + image
    phases = {"read": held + int(decoder_copy)}
    held += model.sessions + display_bytes
    phases["embed"] = held + display_work + intake + resize + pixel_values + model.encoder_work
    held += model.encoder_work
    phases["decode"] = held + logits + decoder_work + masks + 2 * DECODER_BATCH * LOGITS_BYTES
    held += decoder_work + logits + masks
    phases["write"] = held + max(out, figure)
    return MemoryEstimate(parts, phases)


def advice(estimate: MemoryEstimate, output: str) -> str:
    """What to change, from the largest parts of ``estimate``."""
    tips = []
    for name, _ in estimate.largest(3):
        if name in ("masks", "low-res logits", "decoder") and "fewer boxes per run" not in tips:
            tips.append("fewer boxes per run")
        elif name == "output" and output in (".png", ".nii", ".nii.gz", ".npy"):
            tips.append("--out .npz (mask crops instead of a full-size label image)")
        elif name == "overlay":
            tips.append("no --overlay")
        elif name in ("image", "decoding copy", "display conversion", "resize"):
            tips.append("a cropped or smaller image")
        elif name in ("encoder", "model sessions"):
            tips.append("a smaller model or precision (int8)")
    tips.append("--max-memory SIZE to allow more")
    return "; ".join(dict.fromkeys(tips))


def check(estimate: MemoryEstimate, budget: int | None = None, *, output: str = ".npz") -> None:
    """Refuse a request whose estimated peak exceeds ``budget`` bytes (default: :func:`default_budget`).

    Raises:
        MemoryBudgetError: one line with what it would need, the budget and what to change.
    """
    limit = default_budget() if budget is None else int(budget)
    if estimate.peak <= limit:
        return
    source = "--max-memory" if budget is not None else f"{DEFAULT_FRACTION:.0%} of the available memory"
    raise MemoryBudgetError(
        f"this request needs about {estimate.describe()}, over the {format_size(limit)} budget ({source}); "
        f"try {advice(estimate, output)}",
        needed=estimate.peak,
        budget=limit,
    )


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a ``MemoryError``, or ONNX Runtime's own allocation failure (its
    ``Fail`` exception, not a ``MemoryError``: "Failed to allocate memory for requested buffer", or a C++
    ``bad_alloc``)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "[ONNXRuntimeError]" in text and any(
        s in text for s in ("Failed to allocate memory", "bad_alloc", "bad allocation")
    )


def image_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of a Pillow-readable image file from its header (no pixels decoded), as
    :func:`medsam_rt.core.images.read_image` will return it; ``None`` for other files (DICOM, NIfTI, unreadable)."""
    from PIL import Image, UnidentifiedImageError

    modes = {"1": (1, np.uint8), "L": (1, np.uint8), "I;16": (1, np.uint16), "I;16B": (1, np.uint16)}
    modes |= {"I;16L": (1, np.uint16), "I": (1, np.int32), "F": (1, np.float32), "RGB": (3, np.uint8)}
    modes |= {"RGBA": (4, np.uint8)}
    try:
        with warnings.catch_warnings(), Image.open(path) as img:  # (the reader warns once it decodes, if at all)
            warnings.simplefilter("ignore")
            channels, dtype = modes.get(img.mode, (4 if "A" in img.mode else 3, np.uint8))
            h, w = img.height, img.width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return ((h, w) if channels == 1 else (h, w, channels)), np.dtype(dtype)


def _cli_budget(args: Any) -> int | None:
    value = getattr(args, "max_memory", None)
    return None if value is None else parse_size(value)


def check_cli_header(args: Any) -> MemoryEstimate | None:
    """The ``medsam-rt segment`` check before decoding: a Pillow-readable ``args.image`` is estimated from its
    header with no boxes (a lower bound of the request: reading, embedding and the output's label image) and
    refused above the budget; other files (DICOM, NIfTI) are left to :func:`check_cli_segment`.

    Raises:
        MemoryBudgetError: over the budget.
    """
    from medsam_rt.core.manifest import load_manifest
    from medsam_rt.core.providers import resolve_device
    from medsam_rt.io.formats import is_dicom, is_nifti
    from medsam_rt.io.results import output_suffix

    path = Path(args.image)
    header = image_header(path) if path.is_file() and not is_nifti(path) and not is_dicom(path) else None
    if header is None:
        return None
    shape, dtype = header
    suffix = output_suffix(args.out)
    manifest = load_manifest(Path(args.model_dir))
    estimate = estimate_segment(
        shape[:2],
        np.zeros((0, 4)),
        ModelCost.of(manifest, args.precision, resolve_device(args.device)),
        manifest.preprocessing,
        dtype=dtype,
        channels=shape[2] if len(shape) == 3 else 1,
        output=suffix,
        overlay=getattr(args, "overlay", None) is not None,
    )
    check(estimate, _cli_budget(args), output=suffix)
    return estimate


def check_cli_segment(args: Any, scan: Any, plan: dict[int, list[list[float]]]) -> MemoryEstimate:
    """The ``medsam-rt segment`` check: estimate ``plan`` on ``scan`` for ``args`` (model_dir, precision, device,
    out, overlay, max_memory) and refuse it above the budget (``--max-memory`` or the default).

    Raises:
        MemoryBudgetError: over the budget. ModelDirError: not a model directory, or see :meth:`ModelCost.of`.
    """
    from medsam_rt.core.manifest import load_manifest
    from medsam_rt.core.providers import resolve_device
    from medsam_rt.io.results import output_suffix

    manifest = load_manifest(Path(args.model_dir))
    suffix = output_suffix(args.out)
    values = scan.values  # (S, H, W) or (S, H, W, C)
    estimate = estimate_segment(
        scan.image_size,
        [np.asarray(plan[k], np.float64) for k in sorted(plan)],
        ModelCost.of(manifest, args.precision, resolve_device(args.device)),
        manifest.preprocessing,
        dtype=values.dtype,
        channels=values.shape[3] if values.ndim == 4 else 1,
        slices=values.shape[0],
        output=suffix,
        overlay=getattr(args, "overlay", None) is not None,
        decoded=False,  # already read: what it holds now is counted in the image
    )
    check(estimate, _cli_budget(args), output=suffix)
    return estimate


__all__ = [
    "is_allocation_failure",
    "DEFAULT_FRACTION",
    "MemoryEstimate",
    "ModelCost",
    "available_bytes",
    "check",
    "check_cli_header",
    "check_cli_segment",
    "current_rss",
    "default_budget",
    "estimate_segment",
    "format_size",
    "image_header",
    "parse_size",
]
