"""``OrtValue`` buffers in an execution target's memory and copies between them (the IO-bound runner's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

#: How :func:`copy_into` copies between devices: "ortvalue" (``OrtValue.update_inplace(OrtValue)``, ONNX Runtime
#: 1.32+: device to device) until that fails once, then "host round trip" (through a numpy array).
copy_method = "ortvalue"


def copy_into(dst: ort.OrtValue, src: ort.OrtValue) -> None:
    """Copy ``src``'s data into ``dst``'s buffer (same shape and type); ``dst`` keeps its address, which is what
    a CUDA graph's bound inputs and outputs need."""
    global copy_method
    if copy_method == "ortvalue":
        try:
            dst.update_inplace(src)
            return
        except (TypeError, ValueError, RuntimeError):  # older ONNX Runtime: numpy arrays only
            copy_method = "host round trip"
    dst.update_inplace(np.ascontiguousarray(src.numpy()))


def device_buffer(shape: Sequence[int], device: str) -> ort.OrtValue:
    """An uninitialised float32 buffer of ``shape`` on ``device`` (an ``OrtValue`` device type)."""
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, device, 0)


def device_array(a: np.ndarray, device: str) -> ort.OrtValue:
    """A copy of host array ``a`` on ``device`` (an ``OrtValue`` device type)."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)
