"""The postprocessing graph: low-res logits to masks at the original size, so that it can run on the GPU.

The numpy path (:mod:`medsam_rt.core.postprocess`) collapses each recipe's resize chain into one matrix per axis and
computes ``rows @ logits @ cols.T > threshold``. This graph does the same two MatMuls and the threshold with the
matrices as *inputs*: the runtime builds them with the same numpy code (they depend only on the image size, so
they are cheap and cached per size), which makes one graph serve every ``postprocess`` mode of the vocabulary
(``upscale_crop_resize``, ``crop_resize``, ``resize``) exactly as the numpy path defines them.

``low_res_logits [N,1,L,L], num_masks [1], rows [H,L], cols_t [L,W], mask_threshold [] -> masks [n,1,H,W]``,
``n = num_masks``: the first ``n`` of the ``N`` rows (the runtime pads N up to a bucket size for CUDA graphs and
drops the padded rows here, before they are upscaled and copied to the host).

The graph holds no weights and no model-specific value; the exporter writes it beside the encoder and decoder as
``postprocess.onnx`` and records it in the manifest (``postprocess_graph``). Model directories without it work:
the runtime then postprocesses with numpy on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medsam_rt.core.manifest import METADATA_PREFIX, SCHEMA_VERSION

from .util import sha256_file

POSTPROCESS_FILE = "postprocess.onnx"
POSTPROCESS_INPUTS = {
    "low_res_logits": "float32 [N, 1, L, L]: the decoder's output as it is (L = 256)",
    "num_masks": "int64 [1]: n <= N; masks are made for the first n rows only (the rest is bucket padding)",
    "rows": "float32 [H, L]: the recipe's row matrix for this image (H = original height)",
    "cols_t": "float32 [L, W]: the recipe's column matrix for this image, transposed (W = original width)",
    "mask_threshold": "float32 []: the recipe's mask_threshold (a logit)",
}
POSTPROCESS_OUTPUTS = {"masks": "bool [n, 1, H, W]: rows @ logits @ cols_t > mask_threshold, original frame"}


def build_postprocess_graph(opset: int) -> onnx.ModelProto:
    """The graph as an in-memory model for ONNX ``opset`` (every op it uses exists since opset 13)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("low_res_logits", f32, ["num_boxes", 1, "low_res_h", "low_res_w"]),
        helper.make_tensor_value_info("num_masks", i64, [1]),
        helper.make_tensor_value_info("rows", f32, ["height", "low_res_h"]),
        helper.make_tensor_value_info("cols_t", f32, ["low_res_w", "width"]),
        helper.make_tensor_value_info("mask_threshold", f32, []),
    ]
    outputs = [helper.make_tensor_value_info("masks", TensorProto.BOOL, ["num_masks", 1, "height", "width"])]
    for value_info in inputs + outputs:
        value_info.doc_string = {**POSTPROCESS_INPUTS, **POSTPROCESS_OUTPUTS}[value_info.name]
    zero = numpy_helper.from_array(np.zeros(1, np.int64), "zero")
    nodes = [
        helper.make_node("Slice", ["low_res_logits", "zero", "num_masks", "zero"], ["kept"], name="drop_padding"),
        helper.make_node("MatMul", ["rows", "kept"], ["row_resized"], name="resize_rows"),  # [n, 1, H, L]
        helper.make_node("MatMul", ["row_resized", "cols_t"], ["logits"], name="resize_cols"),  # [n, 1, H, W]
        helper.make_node("Greater", ["logits", "mask_threshold"], ["masks"], name="threshold"),
    ]
    graph = helper.make_graph(nodes, "medsam_rt_postprocess", inputs, outputs, initializer=[zero])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="medsam-rt")
    model.ir_version = helper.find_min_ir_version_for(opsets)  # loadable by the oldest runtime that has the opset
    for key, value in (("schema_version", str(SCHEMA_VERSION)), ("role", "postprocess")):
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    onnx.checker.check_model(model, full_check=True)
    return model


def write_postprocess_graph(directory: Path, opset: int) -> dict[str, Any]:
    """Write ``directory/postprocess.onnx``; return its manifest entry (``postprocess_graph``)."""
    path = Path(directory) / POSTPROCESS_FILE
    onnx.save(build_postprocess_graph(opset), str(path))
    return {
        "file": POSTPROCESS_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "inputs": POSTPROCESS_INPUTS,
        "outputs": POSTPROCESS_OUTPUTS,
    }
