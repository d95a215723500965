"""Reading images and writing results (atomically)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medsam_rt.errors import InvalidImageError, MedSAMError

Image.MAX_IMAGE_PIXELS = 400_000_000  # large scans are legitimate; still bounded against decompression bombs


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file into an array, keeping its bit depth.

    PNG/JPEG/TIFF/BMP/... via Pillow: 8-bit files give uint8 ``(H, W)`` or
    ``(H, W, 3|4)``; 16-bit grayscale gives uint16; 32-bit integer/float
    TIFFs give int32/float32. Palette and other modes are converted to RGB(A).
    Multi-page files: the first page.

    Raises:
        InvalidImageError: missing, unreadable or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            covered = sum((t.extents[2] - t.extents[0]) * (t.extents[3] - t.extents[1]) for t in img.tile)
            if img.tile and covered < img.width * img.height:  # Pillow would zero-fill what the data lacks
                raise OSError(
                    f"its header says {img.width}x{img.height} pixels but its data covers {covered}: "
                    "corrupt header or truncated file"
                )
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(img, dtype=np.uint16)
            if img.mode not in ("L", "RGB", "RGBA", "I", "F"):
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            return np.array(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"cannot read image {path}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{path} is too large: {exc}") from None


def check_parent_writable(path: Path, what: str, error: type[MedSAMError]) -> None:
    """Raise ``error`` unless ``path``'s parent directory exists and is writable (checked before slow work)."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise error(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise error(f"{what} {path}: directory {parent} is not writable")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` and rename it into place.

    A failure leaves ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    tmp = os.fspath(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    # created like any new file (0o666 less the umask), not mkstemp's private 0o600
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
