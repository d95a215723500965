"""``medsam-rt serve``: its command-line parser and handler (imports FastAPI/uvicorn only when run)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EPILOG = """examples:
  medsam-rt serve models/litemedsam                       # http://127.0.0.1:8000/ (this machine only)
  medsam-rt serve models/litemedsam --port 9000 --idle-timeout 600
  MEDSAM_RT_TOKEN=secret medsam-rt serve models/litemedsam --host 0.0.0.0   # others need the token

The page at / draws boxes and shows masks (decoder in the browser after `make -C web`, else on the server).
API: /openapi.json; docs/serve.md."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``sub`` (the CLI's subparsers)."""
    from medsam_rt.tools.cli import DEVICES

    p = sub.add_parser(
        "serve",
        help="run the interactive segmentation server and web page (needs the 'serve' extra)",
        description="Serve MODEL_DIR over HTTP: upload an image once, segment boxes on it; a web page at /.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="directory written by 'medsam-rt export'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="default: %(default)s")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "int8"),
        default="fp32",
        help="graph variant (default: %(default)s: the page's in-browser decoder is the fp32 one)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    p.add_argument(
        "--token",
        default=os.environ.get("MEDSAM_RT_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on the API (default: $MEDSAM_RT_TOKEN; none)",
    )
    p.add_argument("--max-upload-mb", type=float, default=256.0, help="largest request body (default: %(default)s)")
    p.add_argument("--max-boxes", type=int, default=1024, help="most boxes per request (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=64, help="images held at once (default: %(default)s)")
    p.add_argument(
        "--idle-timeout", type=float, default=1800.0, help="seconds before an unused image is dropped (%(default)s)"
    )
    p.add_argument("--cache-mb", type=float, default=256.0, help="embedding cache budget (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="threads running model work (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="model jobs running or waiting (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of ``medsam-rt serve``.

    Raises:
        ServeConfigError: a setting out of range; ServeExtraMissingError: FastAPI/uvicorn not installed.
    """
    from medsam_rt.errors import ServeExtraMissingError
    from medsam_rt.tools.serve.config import ServeConfig

    for module in ("fastapi", "uvicorn", "multipart"):
        try:
            __import__(module)
        except ImportError:
            raise ServeExtraMissingError(f"medsam-rt serve needs {module}: pip install 'medsam-rt[serve]'") from None
    from medsam_rt.tools.serve import serve

    serve(
        ServeConfig(
            model_dir=args.model_dir,
            host=args.host,
            port=args.port,
            device=args.device,
            precision=args.precision,
            threads=args.threads,
            token=args.token or None,
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
            max_boxes=args.max_boxes,
            max_images=args.max_images,
            idle_timeout_s=args.idle_timeout,
            cache_bytes=int(args.cache_mb * (1 << 20)),
            workers=args.workers,
            max_queue=args.max_queue,
        )
    )
    return 0
