"""The ``medsam`` model of a Triton repository: Triton's Python backend running MedSAM's whole pipeline (BLS).

``medsam-rt triton`` copies this file to ``<repository>/medsam/1/model.py`` beside the model directory's
``manifest.json``. Each request carries one image and its boxes; the model preprocesses the image with the
manifest's recipe (:mod:`medsam_rt.core.preprocess`), runs the ``medsam_encoder`` model, scales the boxes into the
encoder frame, runs ``medsam_decoder`` (at most ``max_boxes_per_call`` boxes per call, as the runtime on the CPU)
and makes the masks at the image's size (:mod:`medsam_rt.core.postprocess`, :class:`medsam_rt.core.masks.Masks`): the
steps of docs/onnx-contract.md, so the label image is the one ``medsam-rt segment`` writes.

Inputs: ``IMAGE`` uint8 ``[H, W, 3]`` (RGB; repeat a gray image to three channels), ``BOXES`` float32 ``[N, 4]``
x0, y0, x1, y1 in the image's pixels. Outputs: ``LABELS`` uint16 ``[H, W]`` (0 background, ``k`` the ``k``-th
box; later boxes over earlier ones where masks overlap, ranked by logits as the runtime does), ``SCORES`` float32
``[N]`` (the decoder's IoU estimates). Triton's Python environment needs ``numpy`` and ``medsam-rt`` installed.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

    return pb_utils


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute`` (a list of requests), ``finalize``."""

    def initialize(self, args: dict) -> None:
        from medsam_rt.core.preprocess import Preprocessing

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.encoder = params.get("encoder_model", "medsam_encoder")
        self.decoder = params.get("decoder_model", "medsam_decoder")
        self.max_boxes = int(params.get("max_boxes_per_call", "16"))
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "manifest.json"), encoding="utf-8") as fh:
            self.preprocessing = Preprocessing.from_dict(json.load(fh)["preprocessing"])

    def execute(self, requests: list) -> list:
        pb = _pb()
        responses = []
        for request in requests:
            try:
                image = pb.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                boxes = pb.get_input_tensor_by_name(request, "BOXES").as_numpy()
                labels, scores = self.segment(image, boxes)
                outputs = [pb.Tensor("LABELS", labels), pb.Tensor("SCORES", scores)]
                responses.append(pb.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # this request's error, the others go on
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"{exc}")))
        return responses

    def finalize(self) -> None:
        pass

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        pb = _pb()
        request = pb.InferenceRequest(
            model_name=model,
            requested_output_names=outputs,
            inputs=[pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [pb.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint16 ``[H, W]`` label image and float32 ``[N]`` scores of ``boxes`` on ``image`` (see the module)."""
        from medsam_rt.core.masks import Masks
        from medsam_rt.core.postprocess import chain
        from medsam_rt.core.preprocess import preprocess_image, scale_boxes, to_rgb_uint8, validate_boxes

        rgb = to_rgb_uint8(image)
        original = (int(rgb.shape[0]), int(rgb.shape[1]))
        boxes = validate_boxes(boxes, original)
        pixel_values, resized = preprocess_image(rgb, self.preprocessing)
        (embedding,) = self._infer(self.encoder, {"pixel_values": pixel_values}, ["image_embeddings"])
        scaled = scale_boxes(boxes, original, resized, self.preprocessing).astype(np.float32)
        parts = [
            self._infer(
                self.decoder,
                {"image_embeddings": embedding, "boxes": scaled[i : i + self.max_boxes]},
                ["low_res_logits", "iou_scores"],
            )
            for i in range(0, len(scaled), self.max_boxes)
        ]
        low_res = np.concatenate([logits[:, 0] for logits, _ in parts])
        scores = np.concatenate([iou[:, 0] for _, iou in parts]).astype(np.float32)
        upscale = chain(self.preprocessing, resized, original, low_res.shape[1:])
        masks = Masks(
            original,
            [upscale.mask_crop(logits) for logits in low_res],
            logits_in=lambda k, rows, cols: upscale.window(low_res[k], rows, cols),
        )
        return masks.label_image().astype(np.uint16), scores
