"""The ``batch`` and ``triton`` subcommands (registered by :mod:`medsam_rt.tools.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES_BATCH = """examples:
  medsam-rt batch models/litemedsam jobs.jsonl --out segs/                     # process pool, 1 worker
  medsam-rt batch models/litemedsam jobs.jsonl --out segs/ --workers 4
  medsam-rt batch models/litemedsam cases/ --out segs/ --engine ray --workers 8    # CVPR24 npz cases on Ray
  medsam-rt batch models/medsam jobs.jsonl --out /shared/segs --engine ray --address ray://head:10001 \\
      --workers 16 --device cuda

jobs.jsonl, one job a line (paths relative to the file's folder):
  {"image": "ct/scan1.dcm", "boxes": [[40, 30, 90, 80]], "window": "soft-tissue"}
  {"id": "liver-07", "image": "vol.nii.gz", "slice": 40, "boxes": [[100, 80, 160, 150], [20, 20, 60, 70]]}
  {"image": "series/", "boxes3d": [[120, 90, 30, 200, 170, 58]]}
  {"image": "cases/2DBox_CXR_demo.npz"}
outputs: OUT_DIR/<id>.png (label image, "boxes"), OUT_DIR/<id>.nii.gz (label volume, "boxes3d"),
OUT_DIR/<case file name> ("segs", npz cases); id defaults to the file name without its extension.
Failed jobs: OUT_DIR/failures.jsonl. Exit code 0: every job ok; 1: some failed; 2: usage error.
"""
EXAMPLES_TRITON = """examples:
  medsam-rt triton models/litemedsam triton-repo/
  medsam-rt triton models/medsam triton-repo/ --precision fp16 --kind gpu --instances 2
  tritonserver --model-repository triton-repo/        # see triton-repo/README.md
"""


def add_parsers(sub) -> None:
    """Add ``batch`` and ``triton`` to the ``medsam-rt`` subcommands."""
    from medsam_rt.core.manifest import PRECISIONS
    from medsam_rt.core.providers import DEVICES
    from medsam_rt.tools.scale.batch import ENGINES
    from medsam_rt.tools.scale.triton import KINDS

    formatter = argparse.RawDescriptionHelpFormatter
    bt = sub.add_parser(
        "batch",
        help="segment a job list (JSONL, or a folder of CVPR24 npz cases) on a process pool or on Ray",
        description="Run every job of JOBS with one loaded model per worker, writing one output per job "
        "atomically; jobs whose output exists are skipped (resume), failures are listed and do not stop the run.",
        epilog=EXAMPLES_BATCH,
        formatter_class=formatter,
    )
    bt.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="directory written by 'medsam-rt export'")
    bt.add_argument("jobs", type=Path, metavar="JOBS", help="JSONL job list, or a folder of CVPR24 .npz cases")
    bt.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="output folder (created)")
    bt.add_argument("--engine", choices=ENGINES, default="local", help="default: %(default)s")
    bt.add_argument("--address", metavar="ADDR", help="ray: the cluster to join (default: a local Ray instance)")
    bt.add_argument("--workers", type=int, default=1, metavar="N", help="models loaded at once (default: 1)")
    bt.add_argument(
        "--threads", type=int, metavar="T", help="intra-op threads per worker (default: this machine's cores // N)"
    )
    bt.add_argument("--device", choices=DEVICES, default="cpu", help="default: %(default)s")
    bt.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default="auto", help="graph variant (default: %(default)s)"
    )
    bt.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip jobs whose output exists (default: on)",
    )
    bt.add_argument("--json", action="store_true", help="print the summary as JSON")
    bt.add_argument("--quiet", action="store_true", help="print nothing but errors (and --json)")

    tr = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository (onnxruntime backend) for an exported model",
        description="Write OUT_DIR as a Triton model repository: the encoder and decoder as onnxruntime-backend "
        "models, an ensemble of the two, and a Python-backend (BLS) model running preprocess -> encoder -> decoder "
        "-> masks, with config.pbtxt files and a README.",
        epilog=EXAMPLES_TRITON,
        formatter_class=formatter,
    )
    tr.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="directory written by 'medsam-rt export'")
    tr.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the repository to write")
    tr.add_argument("--precision", choices=PRECISIONS, default="fp32", help="graph variant (default: %(default)s)")
    tr.add_argument("--kind", choices=tuple(KINDS), default="cpu", help="instance group kind (default: %(default)s)")
    tr.add_argument("--instances", type=int, default=1, metavar="N", help="instances per model (default: 1)")
    tr.add_argument(
        "--cuda-options",
        default="default",
        metavar="NAME",
        help="with --kind gpu: the CUDA provider options of this medsam_rt.core.cuda option set (default: %(default)s)",
    )
    tr.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def cmd_batch(args: argparse.Namespace) -> int:
    from medsam_rt.tools.scale.batch import print_summary, run_batch

    summary = run_batch(
        args.model_dir,
        args.jobs,
        args.out,
        engine=args.engine,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        address=args.address,
        resume=args.resume,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    elif not args.quiet:
        print_summary(summary)
    if summary.failed:
        print(f"medsam-rt: {summary.failed} job(s) failed: see {summary.failures}", file=sys.stderr)
        return 1
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from medsam_rt.tools.scale.triton import write_repository

    models = write_repository(
        args.model_dir,
        args.out_dir,
        precision=args.precision,
        kind=args.kind,
        instances=args.instances,
        cuda_options=args.cuda_options,
        force=args.force,
    )
    print(f"wrote {args.out_dir}: models {', '.join(models)}; see {args.out_dir / 'README.md'}")
    return 0


#: ``medsam-rt`` subcommand name -> function.
COMMANDS = {"batch": cmd_batch, "triton": cmd_triton}

__all__ = ["COMMANDS", "add_parsers", "cmd_batch", "cmd_triton"]
