"""Sample images with boxes: synthetic phantoms with known ground truth (numpy only) and the real medical
images that ship inside pydicom, nibabel and scikit-image (used when those packages are installed).

Together they are medsam-rt's validation set: the demo runs it, and the tests compare medsam-rt against
reference implementations on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medsam_rt.io.medical import CT_WINDOWS, percentile_clip, window


@dataclass(frozen=True)
class Sample:
    """An image with boxes and, where known, ground-truth masks.

    Attributes:
        name: short description.
        image: ``(H, W)`` or ``(H, W, 3)`` uint8 or uint16 image.
        boxes: float64 ``(N, 4)`` x0, y0, x1, y1 in the image's pixels.
        truth: bool ``(N, H, W)`` ground-truth masks, or ``None`` when unknown (real images).
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    truth: np.ndarray | None = None


def _box_of(mask: np.ndarray, margin: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [
            max(0, xs.min() - margin),
            max(0, ys.min() - margin),
            min(w, xs.max() + 1 + margin),
            min(h, ys.max() + 1 + margin),
        ],
        np.float64,
    )


def _to_dtype(img: np.ndarray, dtype: type) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 65535
    return (np.clip(img, 0, 1) * top).round().astype(dtype)


def textured_phantom(
    mask: np.ndarray,
    *,
    seed: int = 0,
    dtype: type = np.uint8,
    contrast: float = 0.45,
    noise: float = 0.05,
    margin: int = 5,
    name: str = "phantom",
) -> Sample:
    """An image where ``mask`` is brighter than a smooth, noisy background; the box is the mask's, padded."""
    rng = np.random.default_rng(seed)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    background = 0.25 + 0.1 * np.sin(xx / w * 3 + rng.uniform(0, 6)) * np.cos(yy / h * 2)
    img = background + contrast * mask + rng.normal(0, noise, (h, w))
    return Sample(name, _to_dtype(img, dtype), _box_of(mask, margin)[None], mask[None].copy())


def ellipse_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random ellipse (centre in the middle third, axes 12-25 % of the sides, any angle)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ay, ax = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
    return u * u + v * v <= 1.0


def ellipse_phantom(height: int = 512, width: int = 512, *, seed: int = 0, dtype: type = np.uint8) -> Sample:
    """A bright ellipse on a smooth noisy background, with its ground truth."""
    return textured_phantom(
        ellipse_mask(height, width, seed),
        seed=seed,
        dtype=dtype,
        name=f"ellipse {height}x{width} {np.dtype(dtype).name}",
    )


def two_ellipse_phantom(height: int = 480, width: int = 640, seed: int = 7) -> Sample:
    """Two separate ellipses (left and right halves): a two-box sample."""
    left = ellipse_mask(height, width // 2, seed)
    right = ellipse_mask(height, width - width // 2, seed + 1)
    a = np.zeros((height, width), bool)
    b = np.zeros((height, width), bool)
    a[:, : width // 2] = left
    b[:, width // 2 :] = right
    s = textured_phantom(a | b, seed=seed, name=f"two ellipses {height}x{width} uint8")
    return Sample(s.name, s.image, np.stack([_box_of(a, 5), _box_of(b, 5)]), np.stack([a, b]))


def phantoms() -> list[Sample]:
    """Ellipse phantoms at several sizes, aspect ratios and bit depths (upscaled and downscaled paths)."""
    return [
        ellipse_phantom(512, 512, seed=1),
        ellipse_phantom(300, 700, seed=2, dtype=np.uint16),
        ellipse_phantom(1024, 768, seed=3),
        ellipse_phantom(97, 203, seed=4),
        ellipse_phantom(1800, 600, seed=5, dtype=np.uint16),
        two_ellipse_phantom(),
    ]


def real_samples() -> list[Sample]:
    """The real medical images shipped in pydicom / nibabel / scikit-image, with hand-placed boxes.

    Packages that are not installed are skipped. The liver sample places pydicom's real liver segmentation
    (``liver_1frame.dcm``) in a textured phantom, so it has ground truth.
    """
    out: list[Sample] = []
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
        out.append(
            Sample(
                "CT_small.dcm soft-tissue window",
                window(hu, *CT_WINDOWS["soft-tissue"]),
                np.array([[45.0, 40, 75, 65], [37, 5, 83, 48]]),
            )
        )
        mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        out.append(Sample("MR_small.dcm 0.5-99.5 %", percentile_clip(mr.pixel_array), np.array([[34.0, 23, 64, 48]])))
        liver = pydicom.dcmread(get_testdata_file("liver_1frame.dcm")).pixel_array > 0
        out.append(textured_phantom(liver, seed=11, contrast=0.3, noise=0.06, name="liver mask phantom 512x512"))
    except ImportError:
        pass
    try:
        import nibabel

        path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
        axial = np.asarray(nibabel.load(path).dataobj)[:, :, 12]
        out.append(Sample("anatomical.nii slice 12", percentile_clip(axial), np.array([[19.0, 10, 31, 21]])))
    except ImportError:
        pass
    try:
        from skimage import data as skdata

        out.append(Sample("skimage cell", skdata.cell(), np.array([[350.0, 300, 500, 450]])))
        out.append(Sample("skimage retina optic disc", skdata.retina(), np.array([[100.0, 500, 330, 750]])))
    except ImportError:
        pass
    return out


def validation_set() -> list[Sample]:
    """Phantoms plus whatever real samples are available."""
    return phantoms() + real_samples()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
