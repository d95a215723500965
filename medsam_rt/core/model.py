"""The facade: ``MedSAM.load(dir)`` -> ``embed(image)`` once -> ``segment(embedding, boxes)`` many times."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam_rt.core.cache import EmbeddingCache, image_digest, model_digest
from medsam_rt.core.checks import precision_check, refusal, warn_fallback
from medsam_rt.core.cuda import CudaOptions
from medsam_rt.core.embedding import ImageEmbedding, array_info, embedding_nbytes, read_only, stored_value
from medsam_rt.core.images import read_image
from medsam_rt.core.manifest import Manifest, check_graph_metadata, load_manifest, verify_graph
from medsam_rt.core.masks import Masks
from medsam_rt.core.postprocess import UpscaleChain, chain, sigmoid
from medsam_rt.core.preprocess import (
    Preprocessing,
    preprocess_image,
    resized_shape,
    scale_boxes,
    to_rgb_uint8,
    validate_boxes,
)
from medsam_rt.core.providers import NodePlacement, create_session, node_placement, resolve_device
from medsam_rt.core.runners import make_runner, session_options
from medsam_rt.core.targets import resolve_options, target
from medsam_rt.errors import EmbeddingMismatchError, InvalidImageError, ModelDirError, PrecisionCheckError

if TYPE_CHECKING:
    from medsam_rt.core.volume import VolumeSegmentation

#: ``cache=`` of :meth:`MedSAM.load`: ``True`` (default budget), ``False``/0 (none), a byte budget or a shared cache.
CacheArg = bool | int | EmbeddingCache | None


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Masks for N boxes at the original resolution, each stored as its tight crop.

    Masks are the exact upscaled logits' ``> mask_threshold`` (see :mod:`medsam_rt.core.postprocess`: the float64
    chain, computed only near each mask's boundary), the same bits on every CPU.

    Attributes:
        boxes: float64 ``(N, 4)`` x0, y0, x1, y1 in original pixels, as given.
        crops: the N masks as :class:`~medsam_rt.core.masks.MaskCrop` (crop + offset, original pixels):
            ``crops.areas()``, ``crops.bounding_boxes()``, ``crops[k].mask``; what every writer uses.
        scores: float32 ``(N,)``: the decoder's IoU estimate per box.
        low_res_logits: float32 ``(N, 256, 256)``: raw decoder output in the encoder frame.
        upscale: the recipe's :class:`~medsam_rt.core.postprocess.UpscaleChain` for this image: maps low-res logits
            ``(n, 256, 256)`` to float32 logits at the original resolution ``(n, H, W)``.
        masks: bool ``(N, H, W)``: the crops on the whole image, built on first access (``N * H * W`` bytes:
            34 GiB for 255 boxes on a 12000x12000 image; prefer ``crops`` for large images or many boxes).
        probs: float32 ``(N, H, W)``: sigmoid of the upscaled logits, computed on first access (the exact chain
            on every pixel, 4 bytes per pixel per box, so ``segment`` does not build it for callers who want
            masks only).
    """

    boxes: np.ndarray
    crops: Masks
    scores: np.ndarray
    low_res_logits: np.ndarray
    upscale: UpscaleChain = field(repr=False)

    @functools.cached_property
    def masks(self) -> np.ndarray:
        return self.crops.dense()

    @functools.cached_property
    def probs(self) -> np.ndarray:
        return sigmoid(self.upscale(self.low_res_logits))

    def label_image(self) -> np.ndarray:
        """uint8 (up to 255 boxes) or uint16 (up to 65535) ``(H, W)``: 0 background, ``k`` (1-based) for box
        ``k``; overlaps go to the most probable box (the highest exact upscaled logit), the first on ties. Built
        from the crops: logits are computed only where masks overlap.

        Raises:
            LabelOverflowError: more than 65535 boxes.
        """
        return self.crops.label_image()


class MedSAM:
    """A MedSAM model directory loaded on ONNX Runtime (no torch needed).

    Use :meth:`load`; then :meth:`embed` each image once and :meth:`segment` it
    with as many boxes as needed. Instances are safe to share between threads
    (ONNX Runtime sessions allow concurrent ``run`` calls; the rest is stateless
    numpy, and the embedding cache has its own lock).

    Attributes:
        cache: the :class:`~medsam_rt.core.cache.EmbeddingCache` used by :meth:`embed`, or ``None``;
            ``model.cache.stats()`` gives hits, misses, evictions and bytes held.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        encoder_path: str | os.PathLike[str],
        decoder_path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        precision: str = "fp32",
        model_id: str,
        threads: int | None = None,
        manifest: Manifest | None = None,
        cache: CacheArg = False,
        cuda_options: str | CudaOptions | None = None,
        postprocess_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """A model from two graph files and a recipe. Most callers want :meth:`load` (a model directory);
        the export gates use this directly. ``device`` must be resolved (a :data:`medsam_rt.core.targets.TARGETS` name);
        ``cuda_options`` a set name, a :class:`~medsam_rt.core.cuda.CudaOptions` or ``None`` (the target's default);
        ``postprocess_path`` is the directory's optional postprocessing graph (masks made on the device)."""
        self.manifest = manifest
        self.device = device
        self.precision = precision
        #: the load-time check of a reduced-precision variant on this CPU (:mod:`medsam_rt.core.checks`), or ``None``
        self.precision_check: dict[str, Any] | None = None
        self.preprocessing = preprocessing
        self._model_id = model_id
        self._paths = {"encoder": Path(encoder_path), "decoder": Path(decoder_path)}
        self._threads = threads
        where = target(device)
        self.cuda_options = options = resolve_options(cuda_options, device)
        provider = session_options(options, where)
        self._encoder = create_session(
            os.fspath(encoder_path), device, threads, provider_options=provider["encoder"], memory_pattern=False
        )
        self._decoder = create_session(  # without memory pattern: N=16 peaks at ~0.5 GB instead of ~1 GB
            os.fspath(decoder_path), device, threads, provider_options=provider["decoder"], memory_pattern=False
        )
        enc_in = self._encoder.get_inputs()[0]
        if list(enc_in.shape[2:]) != list(preprocessing.pad_size):
            name = Path(encoder_path).name
            raise ModelDirError(f"{name} expects input {enc_in.shape}, but the recipe pads to {preprocessing.pad_size}")
        self._embedding_shape = tuple(self._decoder.get_inputs()[0].shape)
        self._cache_key = model_digest(model_id, preprocessing.to_dict())
        self.cache = _make_cache(cache)
        self._runner = make_runner(
            self._encoder,
            self._decoder,
            options=options,
            target=where,
            decoder_path=decoder_path,
            postprocess_path=postprocess_path,
            threads=threads,
            preprocessing=preprocessing,
        )

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        device: str = "cpu",
        precision: str = "auto",
        threads: int | None = None,
        *,
        verify: bool = False,
        cache: CacheArg = False,
        cuda_options: str | CudaOptions | None = None,
    ) -> MedSAM:
        """Load an exported model directory, checking it against its manifest.

        Every load checks the manifest's schema version, each loaded graph's size and sha256 (hashed once per
        file version: a file whose size, inode and mtime were verified before, in this process or recorded in
        the user's cache directory, is not hashed again) and that each graph's metadata names the manifest's
        model, preprocessing, role and precision.

        An int8 or fp16 variant is also checked where it runs: the first time it is loaded on a CPU class not seen
        before for these graph files, it segments the directory's check sample and must match the stored fp32
        results within the export gate's bounds (:mod:`medsam_rt.core.checks`; remembered per CPU class, so later loads
        skip it). With ``precision="auto"`` a variant that fails falls back to fp32 (logged once).

        Args:
            model_dir: directory written by ``medsam-rt export``.
            device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
            precision: ``"fp32"``, ``"fp16"``, ``"int8"`` or ``"auto"``: fp16 on CUDA, int8 on the CPU, when
                exported (their gates passed at export), else fp32. fp16 runs on the CPU provider too (its gate
                ran there) but slower than fp32.
            threads: intra-op threads; default: the physical cores.
            verify: hash every loaded graph regardless of earlier verifications; on CUDA, also profile one run
                of each graph and fail if a node fell back to the CPU (:meth:`node_placement`).
            cache: embedding cache for :meth:`embed`: ``False`` (default: every call encodes, as benchmarks and
                one-shot use want), ``True`` (a cache of :func:`medsam_rt.core.cache.default_max_bytes`, 256 MiB or
                1/32 of the RAM), a budget in bytes, or an :class:`~medsam_rt.core.cache.EmbeddingCache` to share
                between models (keys include the model, precision and preprocessing).
            cuda_options: a named set of :data:`medsam_rt.core.cuda.OPTION_SETS` or a
                :class:`~medsam_rt.core.cuda.CudaOptions` (provider options, IO binding, box-count buckets, CUDA
                graphs, masks made on the device). Default: on CUDA ``$MEDSAM_RT_CUDA_OPTIONS`` or ``"default"``,
                on the CPU the numpy path; a set given on the CPU runs the IO-binding path on the CPU provider
                (without its CUDA provider options).

        Raises:
            ModelDirError: not a valid model directory, the precision was not exported, or a graph file is
                truncated, edited, swapped or from another export (the message names the file).
            ProviderUnavailableError: the device is not available (or, with ``verify`` on CUDA, nodes fell back).
            OptionSetError: an unknown option set name.
            PrecisionCheckError: the requested int8/fp16 variant failed its check on this CPU.
        """
        manifest = load_manifest(Path(model_dir))
        device = resolve_device(device)
        options = resolve_options(cuda_options, device)  # once: every variant tried runs with this set
        chosen = manifest.choose_precision(precision, device)
        try:
            return cls._load_variant(manifest, device, chosen, threads, verify, cache, options)
        except PrecisionCheckError as exc:
            if precision != "auto":
                raise
            warn_fallback(manifest, exc)
            return cls._load_variant(manifest, device, "fp32", threads, verify, cache, options)

    @classmethod
    def _load_variant(
        cls,
        manifest: Manifest,
        device: str,
        precision: str,
        threads: int | None,
        verify: bool,
        cache: CacheArg,
        options: CudaOptions | None,
    ) -> MedSAM:
        enc, dec = manifest.graph("encoder", precision), manifest.graph("decoder", precision)
        used = options is not None and options.device_postprocess  # checked like the others when it is loaded
        post = manifest.postprocess_graph() if used else None
        for entry in (enc, dec, post):
            if entry is not None:
                verify_graph(entry, full=verify)
        model = cls(
            manifest.preprocessing,
            enc.path,
            dec.path,
            device=device,
            precision=precision,
            model_id=f"{manifest.model_id}#{precision}",
            threads=threads,
            manifest=manifest,
            cache=False,  # the load-time check's images stay out of the caller's cache
            cuda_options=options,
            postprocess_path=None if post is None else post.path,
        )
        for entry, session in ((enc, model._encoder), (dec, model._decoder)):
            check_graph_metadata(manifest, entry, session.get_modelmeta().custom_metadata_map)
        if verify and device != "cpu":
            for placement in model.node_placement().values():
                placement.check()
        report = precision_check(model, manifest, device)
        model.precision_check = report
        if report is not None and not report["passed"]:
            raise refusal(manifest, precision, report)
        model.cache = _make_cache(cache)
        return model

    @property
    def model_id(self) -> str:
        """Identity of the model and precision; embeddings carry it and ``segment`` checks it."""
        return self._model_id

    def embed(self, image: np.ndarray | str | os.PathLike[str]) -> ImageEmbedding:
        """Encode one image (run the heavy encoder once).

        Args:
            image: a file path (PNG, JPEG, TIFF, ...) or an array ``(H, W)``,
                ``(H, W, 1|3|4)`` of uint8, uint16 or float (see
                :func:`medsam_rt.core.preprocess.to_rgb_uint8` for intensity handling).

        With the embedding cache on, an image whose pixels (dtype, shape, values) were embedded before by this
        model is not encoded again: the cached (read-only) embedding is returned.

        Raises:
            InvalidImageError: unreadable file or unsupported array.
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        if self.cache is None or not isinstance(image, np.ndarray) or image.dtype.kind not in "biuf":
            return self._embed(image)  # (unsupported arrays raise there)
        key = f"{image_digest(image)}:{self._cache_key}"
        return self.cache.get_or_compute(key, lambda: self._embed(image, shared=True))

    def _embed(self, image: np.ndarray, shared: bool = False) -> ImageEmbedding:
        rgb = to_rgb_uint8(image)
        pixel_values, resized = preprocess_image(rgb, self.preprocessing)
        emb = self._runner.encode(pixel_values)  # a host array, or an OrtValue where the runner keeps it
        if shared:  # cached: every caller gets this object
            emb = read_only(emb)
        return ImageEmbedding(emb, (int(rgb.shape[0]), int(rgb.shape[1])), resized, self.model_id)

    def segment(self, embedding: ImageEmbedding, boxes: Any, *, frame: str = "original") -> Segmentation:
        """Decode masks for boxes on an embedded image.

        Args:
            embedding: from :meth:`embed` of this model.
            boxes: ``(N, 4)`` (or four numbers) x0, y0, x1, y1 in original pixel
                coordinates, ``0 <= x0 < x1 <= W``, ``0 <= y0 < y1 <= H``.
            frame: ``"original"`` (default), or ``"encoder"``: ``boxes`` are already in the encoder's padded input
                frame (``0 <= x0 < x1 <= pad_w``), passed to the decoder as given, as 3-D propagation derives them.

        Raises:
            InvalidBoxError: malformed or out-of-image boxes.
            EmbeddingMismatchError: the embedding came from another model or precision, or was altered.
        """
        self._check_embedding(embedding)
        if frame == "encoder":
            boxes = validate_boxes(boxes, self.preprocessing.pad_size)
            scaled = boxes.astype(np.float32)
        elif frame == "original":
            boxes = validate_boxes(boxes, embedding.original_size)
            scaled = scale_boxes(boxes, embedding.original_size, embedding.resized_size, self.preprocessing)
        else:
            raise ValueError(f"frame must be 'original' or 'encoder', got {frame!r}")
        low = (self._runner.low_res, self._runner.low_res)
        upscale = chain(self.preprocessing, embedding.resized_size, embedding.original_size, low)
        decoded = self._runner.decode(embedding, scaled, upscale)
        low_res = decoded.low_res_logits
        # overlapping masks are ranked by their exact logits, computed where they overlap only
        masks = Masks(
            embedding.original_size,
            decoded.crops,
            logits_in=lambda k, rows, cols: upscale.window(low_res[k], rows, cols),
        )
        return Segmentation(boxes=boxes, crops=masks, scores=decoded.scores, low_res_logits=low_res, upscale=upscale)

    def _check_embedding(self, embedding: Any) -> None:
        if not isinstance(embedding, ImageEmbedding):
            raise EmbeddingMismatchError(
                f"expected an ImageEmbedding from MedSAM.embed, got {type(embedding).__name__}"
            )
        if embedding.model_id != self.model_id:
            raise EmbeddingMismatchError(
                f"embedding was made by model {embedding.model_id!r}, not by this model {self.model_id!r}; "
                "embed the image with this model"
            )
        emb = stored_value(embedding)  # host array or device OrtValue: checked where it lives, without a copy
        info = array_info(emb)
        if (
            info is None
            or info[0] != np.float32
            or len(info[1]) != len(self._embedding_shape)
            or any(isinstance(d, int) and d != n for d, n in zip(self._embedding_shape, info[1], strict=True))
        ):
            got = f"{info[0]} {info[1]}" if info else type(emb).__name__
            raise EmbeddingMismatchError(f"embedding holds {got}; this model's are float32 {self._embedding_shape}")
        try:
            size = tuple(int(v) for v in embedding.original_size)
            ok = (
                len(size) == 2
                and min(size) > 0
                and tuple(embedding.resized_size) == resized_shape(size, self.preprocessing)
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise EmbeddingMismatchError(
                f"embedding sizes original={embedding.original_size!r}, resized={embedding.resized_size!r} are "
                "inconsistent with this model's preprocessing"
            )

    def node_placement(self) -> dict[str, NodePlacement]:
        """Profile one run of each graph on this model's device and report which provider ran each node.

        On CUDA, ``placement.check()`` raises if a node fell back to the CPU other than small shape
        computations; ``placement.summary()`` is a one-line report.
        """
        return {role: node_placement(path, self.device, threads=self._threads) for role, path in self._paths.items()}

    def execution_report(self) -> dict[str, Any]:
        """How this model runs: device, precision, the CUDA option set (``None``: the host runner's numpy feeds)
        and, on the IO-bound runner, what it does (captured graphs, buckets built, where masks are made, device
        copies); ``"io_binding"`` is ``None`` on the host runner."""
        options = self.cuda_options
        report: dict[str, Any] = {"device": self.device, "precision": self.precision}
        report["cuda_options"] = options.to_dict() if options is not None else None
        report["io_binding"] = self._runner.report()
        return report

    def segment_volume(
        self,
        volume: np.ndarray,
        boxes3d: Any,
        *,
        stop_when_empty: bool = False,
        cache_bytes: int | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ) -> VolumeSegmentation:
        """Segment objects in a ``(D, H, W)`` uint8 volume from one 3-D box each (``(N, 6)`` x_min, y_min, z_min,
        x_max, y_max, z_max), propagating through the slices as LiteMedSAM's CVPR24 script does, each slice
        embedded once: see :func:`medsam_rt.core.volume.segment_volume` (arguments, errors) and its
        :class:`~medsam_rt.core.volume.VolumeSegmentation` result."""
        from medsam_rt.core.volume import segment_volume

        return segment_volume(
            self, volume, boxes3d, stop_when_empty=stop_when_empty, cache_bytes=cache_bytes, on_slice=on_slice
        )

    def predict(
        self, image: np.ndarray | str | os.PathLike[str], boxes: Any, *, roi: bool | dict[str, Any] = False
    ) -> Segmentation:
        """``segment(embed(image), boxes)`` in one call.

        ``roi=True`` (or a dict of :func:`medsam_rt.core.roi.segment_roi`'s ``margin``, ``min_side``, ``max_side``)
        embeds a window around the boxes instead of the whole image, so small objects in large images are
        segmented at their own scale (:mod:`medsam_rt.core.roi`; one encoder run per window). Off by default: the
        whole image, as the reference inference does.
        """
        if roi:
            from medsam_rt.core.roi import segment_roi

            return segment_roi(self, image, boxes, **(roi if isinstance(roi, dict) else {}))
        return self.segment(self.embed(image), boxes)


def _make_cache(cache: CacheArg) -> EmbeddingCache | None:
    if isinstance(cache, EmbeddingCache):
        return cache
    if cache is None or cache is False or cache == 0:
        return None
    if cache is True:
        return EmbeddingCache(size_of=embedding_nbytes)  # device-resident embeddings count where they live
    if isinstance(cache, int) and cache > 0:
        return EmbeddingCache(cache, size_of=embedding_nbytes)
    raise ValueError(f"cache must be True, False, a byte budget > 0 or an EmbeddingCache; got {cache!r}")


__all__ = ["ImageEmbedding", "InvalidImageError", "MedSAM", "Segmentation"]
