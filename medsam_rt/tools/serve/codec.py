"""What the API sends back: label images as PNG, masks as COCO RLE, label files through the library's writers."""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from medsam_rt.core.masks import MaskCrop
from medsam_rt.io.results import SliceResult, write_result
from medsam_rt.tools.serve.store import ImageEntry

#: ``format`` values of the label download, and the file ending each is written with.
LABEL_FORMATS = {"png": ".png", "nii": ".nii", "nii.gz": ".nii.gz", "npz": ".npz"}


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG of a uint8 ``(H, W)`` / ``(H, W, 3|4)`` image or a uint16 ``(H, W)`` one (16-bit grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)  # uint16: mode I;16, 16-bit
    return buf.getvalue()


def labels_png_b64(labels: np.ndarray) -> str:
    """Base64 PNG of a label image (uint8 up to 255 boxes, uint16 above: 8- or 16-bit grayscale)."""
    return base64.b64encode(png_bytes(labels)).decode("ascii")


def coco_rle(crop: MaskCrop, image_size: tuple[int, int]) -> dict:
    """COCO's uncompressed RLE of one mask: ``{"size": [H, W], "counts": [...]}``, column-major (Fortran) order,
    the first count being background (0 when the mask starts at pixel (0, 0)). Built from the crop: O(crop area)
    plus the number of runs."""
    h, w = image_size
    if crop.area == 0:
        return {"size": [h, w], "counts": [h * w]}
    y0, x0 = crop.y0, crop.x0
    ch, cw = crop.shape
    # column-major flat positions of the crop's run starts and ends: per crop column, changes along its rows
    cols = np.zeros((cw, ch + 2), np.int8)
    cols[:, 1:-1] = crop.mask.T
    d = np.diff(cols, axis=1)  # +1: a run starts at row r, -1: a run ended before row r
    cj, cr = np.nonzero(d)
    flat = (x0 + cj).astype(np.int64) * h + y0 + cr
    # runs touching across columns merge: an end at p followed by a start at p cancel
    changes = flat
    if len(changes) > 1:
        dup = np.flatnonzero(changes[1:] == changes[:-1])
        if dup.size:
            keep = np.ones(len(changes), bool)
            keep[dup] = False
            keep[dup + 1] = False
            changes = changes[keep]
    edges = np.concatenate([[0], changes, [h * w]])
    return {"size": [h, w], "counts": np.diff(edges).astype(np.int64).tolist()}


def label_file(entry: ImageEntry, results: list[SliceResult], fmt: str) -> bytes:
    """A label file of the segmented slices in ``fmt`` (:data:`LABEL_FORMATS`), written by
    :func:`medsam_rt.io.results.write_result` (PNG: one slice; NIfTI: the source's geometry; npz: mask crops).

    Raises:
        OutputFormatError: the format cannot hold these results (e.g. PNG for several slices).
    """
    with tempfile.TemporaryDirectory(prefix="medsam-serve-") as tmp:
        path = Path(tmp) / f"labels{LABEL_FORMATS[fmt]}"
        write_result(path, entry.scan, results)
        return path.read_bytes()
