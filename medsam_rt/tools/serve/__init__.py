"""``medsam-rt serve``: an interactive segmentation server (FastAPI on uvicorn) and its web page.

The server holds one :class:`~medsam_rt.MedSAM` shared by every request. An upload is read with the library's
readers (PNG/JPEG/TIFF, DICOM, NIfTI: :func:`medsam_rt.io.formats.read_scan`), windowed to 8 bits as
``medsam-rt segment`` does, and each slice is embedded once, in the model's bounded embedding cache (keyed by the
slice's pixels, so identical uploads share it). Boxes are decoded with :meth:`MedSAM.segment`; masks, label
images and RLE are the library's. The page at ``/`` runs the decoder in the browser (onnxruntime-web, when its
vendored files are present: ``make -C web``) on the embedding from ``GET /v1/images/{id}/embedding``, and falls
back to ``POST /v1/images/{id}/segment``.

Only the public runtime API is used here (``MedSAM``, ``Segmentation``, :mod:`medsam_rt.errors`, the readers and
writers of :mod:`medsam_rt.core.images`, :mod:`medsam_rt.io.formats`, :mod:`medsam_rt.io.results`,
:mod:`medsam_rt.core.masks`).
FastAPI, uvicorn and python-multipart are the ``serve`` extra; they are imported by :func:`create_app` and
:func:`serve`, not by this package's import.

Usage::

    medsam-rt serve models/litemedsam --port 8000            # then open http://127.0.0.1:8000/
    medsam-rt serve models/litemedsam --host 0.0.0.0 --token "$(openssl rand -hex 16)"

The API is described at ``/openapi.json``; docs/serve.md has the endpoints, limits and measured latencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medsam_rt.tools.serve.config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(config: ServeConfig, model: Any = None) -> FastAPI:
    """The ASGI application for ``config`` (loads the model unless ``model``, a loaded MedSAM, is given)."""
    from medsam_rt.tools.serve.app import create_app as _create

    return _create(config, model)


def serve(config: ServeConfig) -> None:
    """Load the model and run the server until interrupted (uvicorn, one process)."""
    from medsam_rt.tools.serve.app import run

    run(config)


__all__ = ["ServeConfig", "create_app", "serve"]
