"""Bounded preprocessing memory (equal to the whole-plane recipe), request estimates against measured peak RSS, and
refusals before the slow work (medsam_rt.core.preprocess, medsam_rt.tools.budget,
``medsam-rt segment --max-memory``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_peak
from PIL import Image

from medsam_rt.core import preprocess
from medsam_rt.core.preprocess import PIL_FILTERS, Preprocessing, preprocess_image, resized_shape, to_rgb_uint8
from medsam_rt.core.resample import area_matrices
from medsam_rt.errors import MemoryBudgetError, UsageError
from medsam_rt.tools.budget import (
    MemoryEstimate,
    ModelCost,
    available_bytes,
    check,
    estimate_segment,
    format_size,
    image_header,
    parse_size,
)

LITE = Preprocessing(
    resize="longest_side", size=256, interpolation="area", normalize="minmax", pad_size=(256, 256),
    postprocess="crop_resize", box_scale="longest_side", box_round="floor",
)  # fmt: skip
HF = Preprocessing(
    resize="longest_side", size=1024, interpolation="bilinear", normalize="rescale_mean_std", pad_size=(1024, 1024),
    postprocess="upscale_crop_resize", rescale_factor=1 / 255, image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
)  # fmt: skip
SQUARE = Preprocessing(
    resize="square", size=1024, interpolation="bicubic", normalize="minmax", pad_size=(1024, 1024),
    postprocess="resize",
)  # fmt: skip


# --- the whole-plane recipe as it was before bounded memory: the oracle ---------------------------------------


def _dense_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[2] == 4:
        if image.dtype == np.uint8:
            color, alpha = image[:, :, :3], image[:, :, 3]
        else:
            color = _dense_minmax(image[:, :, :3])
            full = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
            alpha = np.rint(np.clip(image[:, :, 3].astype(np.float64) / full, 0.0, 1.0) * 255).astype(np.uint8)
        white = Image.new("RGBA", (image.shape[1], image.shape[0]), (255, 255, 255, 255))
        top = Image.fromarray(np.dstack([color, alpha]), "RGBA")
        return np.asarray(Image.alpha_composite(white, top).convert("RGB")).copy()
    if image.dtype != np.uint8:
        image = _dense_minmax(image)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


def _dense_minmax(image: np.ndarray) -> np.ndarray:
    data = image.astype(np.float64)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    if not np.isfinite(hi - lo):
        data, lo, hi = data / 2, lo / 2, hi / 2
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _dense_resize(rgb: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    if interpolation == "area":
        rows, cols = area_matrices(size, rgb.shape[:2])
        out = np.empty((rows.shape[0], cols.shape[0], 3))
        for ch in range(3):
            plane = rgb[:, :, ch].astype(np.float64)
            out[:, :, ch] = (rows @ plane) @ cols.T if rows.shape[0] <= cols.shape[0] else rows @ (plane @ cols.T)
        halving = rgb.shape[0] == 2 * size[0] and rgb.shape[1] == 2 * size[1]
        out = np.floor(out + 0.5) if halving else np.rint(out)
        return np.clip(out, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample=PIL_FILTERS[interpolation]))


def _dense_pixels(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    rgb = _dense_to_rgb(image)
    return _finish(_dense_resize(rgb, resized_shape(rgb.shape[:2], p), p.interpolation), p)


def _finish(resized: np.ndarray, p: Preprocessing) -> np.ndarray:
    out = np.zeros((1, 3, *p.pad_size), np.float32)
    h, w = resized.shape[:2]
    out[0, :, :h, :w] = preprocess.normalize(resized, p).transpose(2, 0, 1)
    return out


def _images():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 333), (700, 1), (2, 2), (33, 41), (97, 203), (512, 512), (511, 513)]:
        g = rng.integers(0, 256, shape, dtype=np.uint8)
        yield f"gray{shape}", g
        yield f"gray1{shape}", g[:, :, None]
        yield f"rgb{shape}", rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        yield f"u16{shape}", rng.integers(0, 65536, shape, dtype=np.uint16)
        yield f"f32rgb{shape}", rng.standard_normal((*shape, 3)).astype(np.float32)
        yield f"rgba16{shape}", rng.integers(0, 65536, (*shape, 4), dtype=np.uint16)
        yield f"bool{shape}", g > 100
    yield "huge span", np.array([[-1e308, 0.0, 1e308]])
    yield "constant", np.full((5, 7), 1234.5)


@pytest.mark.parametrize("p", [LITE, HF, SQUARE], ids=["area", "bilinear", "bicubic-square"])
def test_bounded_preprocessing_equals_whole_plane_recipe(p, monkeypatch):
    """Row blocks, one plane for grayscale and one band at a time for Pillow give the old whole-plane outputs bit
    for bit; small blocks (many strips, tails) are forced so the block loops run on these small images."""
    monkeypatch.setattr(preprocess, "BLOCK_BYTES", 1 << 15)
    for name, image in _images() if p is LITE else list(_images())[::3]:  # Pillow's filters: blocks only at intake
        ours, _ = preprocess_image(to_rgb_uint8(image), p)
        # (forced strips split the BLAS product along the kept axis: its float64 sums may differ in the last
        # bit, which the rounding to uint8 absorbs except at exact ties, none here; at the default block size
        # images up to 8 Mpx are one product, see below)
        np.testing.assert_array_equal(ours, _dense_pixels(image, p), err_msg=name)


def test_default_blocks_are_one_product_up_to_8_megapixels():
    """At the default block size an image up to 8 Mpx is one strip: the same BLAS call as before, so even the
    float64 intermediate is the same; larger images are split."""
    img = np.random.default_rng(0).integers(0, 256, (2000, 3000), dtype=np.uint8)
    rows, cols = area_matrices(resized_shape(img.shape, LITE), img.shape)
    from medsam_rt.core.resample import apply_separable

    plane = img.astype(np.float64)
    np.testing.assert_array_equal(apply_separable(img, rows, cols), (rows @ plane) @ cols.T)
    assert len(preprocess.row_blocks(12000, 12000 * 8)) == 12000 * 12000 * 8 // preprocess.BLOCK_BYTES + 1


def test_grayscale_intake_is_a_view_and_preprocessing_memory_is_bounded():
    gray = np.random.default_rng(1).integers(0, 256, (6000, 6000), dtype=np.uint8)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (6000, 6000, 3) and np.shares_memory(rgb, gray) and not rgb.flags.writeable
    np.testing.assert_array_equal(rgb[123, 456], [gray[123, 456]] * 3)
    for image, p in ((gray, LITE), (gray, HF), (gray.astype(np.uint16) * 257, LITE)):
        tracemalloc.start()
        preprocess_image(to_rgb_uint8(image), p)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # before: a 3-channel copy (108 MB) and a float64 plane (288 MB; 16-bit: two more) at least; now one
        # 64 MiB strip, the uint8 plane of a 16-bit image (36 MB), the first product (12 MB) and small results
        assert peak < 130e6, (image.dtype, p.interpolation, peak / 1e6)


# --- estimates and budgets ---------------------------------------------------------------------------------------


def test_parse_and_format_sizes():
    assert parse_size("2G") == 2 << 30 and parse_size("1.5GiB") == 3 << 29 and parse_size("800MB") == 800 << 20
    assert parse_size("4096") == 4096 and parse_size(" 64k ") == 64 << 10
    for bad in ("", "two", "-1G", "0", "5X"):
        with pytest.raises(UsageError, match="memory size"):
            parse_size(bad)
    assert format_size(3 << 29) == "1.50 GiB" and format_size(300 << 20) == "300 MiB"
    assert 0 < available_bytes() < 1 << 50


def test_estimate_parts_follow_the_request():
    model = ModelCost("litemedsam", 85 << 20, 300 << 20, 32 << 20)
    boxes = np.array([[0, 0, 100, 50], [10.5, 10.5, 20.2, 30.9]] * 200)  # 400 boxes
    e = estimate_segment((12000, 12000), boxes, model, LITE, output=".png")
    assert e.parts["image"] == 144_000_000 and e.parts["masks"] == 200 * (5000 + 11 * 21)
    assert e.parts["low-res logits"] == 400 * 256 * 256 * 4 and e.parts["decoder"] == 16 * (32 << 20)
    assert e.parts["output"] == 2 * 2 * 144_000_000  # uint16 labels (400 boxes) and the PNG encoder's copy
    npz = estimate_segment((12000, 12000), boxes, model, LITE, output=".npz")
    assert npz.parts["output"] == npz.parts["masks"] and npz.peak < e.peak
    assert list(e.phases) == ["read", "embed", "decode", "write"] and e.peak == max(e.phases.values())
    u16 = estimate_segment((12000, 12000), boxes, model, LITE, dtype=np.uint16, output=".npz")
    assert u16.parts["display copy"] == 144_000_000 and u16.parts["image"] == 288_000_000
    with pytest.raises(MemoryBudgetError, match=r"needs about .* over the 1.00 GiB budget .*--out .npz") as info:
        check(e, 1 << 30, output=".png")
    assert info.value.needed == e.peak and info.value.budget == 1 << 30 and "\n" not in str(info.value)
    check(e, e.peak)  # at the budget: accepted
    assert isinstance(e, MemoryEstimate) and "GiB at its peak (write" in e.describe()


def test_image_header_reads_no_pixels(tmp_path):
    Image.fromarray(np.zeros((30, 40), np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"not an image")
    assert image_header(tmp_path / "a.png") == ((30, 40), np.dtype(np.uint16))
    assert image_header(tmp_path / "b.png") == ((30, 40, 3), np.dtype(np.uint8))
    assert image_header(tmp_path / "c.png") is None


def _slide(tmp_path: Path, size: int, n: int, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """A noisy ``size``-square gray PNG with ``n`` bright discs, and their boxes as a --boxes file."""
    rng = np.random.default_rng(seed)
    image = rng.integers(30, 50, (size, size), dtype=np.uint8)
    centres = rng.uniform(60, size - 60, (n, 2))
    r = rng.uniform(15, 40, n)
    boxes = np.c_[centres - r[:, None] - 3, centres + r[:, None] + 3].round()
    for (cx, cy), rad in zip(centres, r, strict=True):
        y0, x0 = int(cy - rad), int(cx - rad)
        y, x = np.ogrid[y0 : int(cy + rad) + 1, x0 : int(cx + rad) + 1]
        image[y0 : int(cy + rad) + 1, x0 : int(cx + rad) + 1][(x - cx) ** 2 + (y - cy) ** 2 <= rad**2] = 190
    Image.fromarray(image).save(tmp_path / f"slide{size}.png", compress_level=1)
    (tmp_path / "boxes.csv").write_text("".join(f"{int(a)},{int(b)},{int(c)},{int(d)}\n" for a, b, c, d in boxes))
    return tmp_path / f"slide{size}.png", tmp_path / "boxes.csv", boxes


@pytest.mark.parametrize("size,n,out", [(1500, 20, "m.png"), (7000, 40, "m.npz"), (9000, 24, "m.png")])
def test_estimate_within_25_percent_of_measured_peak(lite_dir, tmp_path, size, n, out):
    """The real CLI on LiteMedSAM (fp32): the estimate of ``check_cli_segment`` against the child's peak RSS."""
    from medsam_rt.io.formats import read_scan
    from medsam_rt.tools.budget import check_cli_segment
    from medsam_rt.tools.cli import _plan_slices, build_parser

    image, box_file, _ = _slide(tmp_path, size, n)
    argv = ["segment", str(lite_dir), str(image), "--boxes", str(box_file), "--out", str(tmp_path / out)]
    argv += ["--precision", "fp32", "--quiet"]
    args = build_parser().parse_args(argv)
    scan = read_scan(image)
    estimate = check_cli_segment(args, scan, _plan_slices(args, scan))
    rc, peak, err = run_cli_peak(*argv)
    assert rc == 0, err
    ratio = estimate.peak / peak
    print(json.dumps({"size": size, "boxes": n, "out": out, "estimate_mib": estimate.peak >> 20,
                      "measured_mib": int(peak) >> 20, "ratio": round(ratio, 3)}))  # fmt: skip
    assert 0.75 <= ratio <= 1.25, (estimate.describe(), peak / 2**20)


def test_request_over_budget_is_refused_before_the_slow_work(lite_dir, tmp_path):
    image, box_file, _ = _slide(tmp_path, 3000, 30)
    argv = ["segment", str(lite_dir), str(image), "--boxes", str(box_file), "--out", str(tmp_path / "m.png")]
    t = time.perf_counter()
    rc, peak, err = run_cli_peak(*argv, "--max-memory", "300M")
    took = time.perf_counter() - t
    assert rc == 2 and err.count("\n") == 1 and err.startswith("medsam-rt: error: this request needs about ")
    assert "over the 300 MiB budget (--max-memory)" in err and "try " in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists() and peak < 200 << 20  # neither the image decoded nor the model loaded
    assert took < 30, took
    rc, _, err = run_cli_peak(*argv, "--max-memory", "lots")
    assert rc == 2 and "memory size 'lots' is not a size" in err
    # after decoding: the boxes make it too large (the header alone fits)
    many = "".join(f"{x},{y},{x + 900},{y + 900}\n" for x in range(0, 2000, 100) for y in range(0, 2000, 100))
    (tmp_path / "many.csv").write_text(many)
    argv[4] = str(tmp_path / "many.csv")
    rc, peak, err = run_cli_peak(*argv, "--max-memory", "700M", "--out", str(tmp_path / "m.npz"))
    assert rc == 2 and "(decode:" in err or "(write:" in err, err
    assert "masks" in err and "fewer boxes per run" in err


def test_cli_memory_error_is_one_line(tiny_dir, tmp_path):
    """The last line of defence: a MemoryError anywhere ends as one line and exit code 2 (here: the address
    space is limited below what reading the image needs, past a budget that allows it)."""
    image = tmp_path / "big.png"
    Image.fromarray(np.zeros((6000, 6000), np.uint8)).save(image)
    code = (
        "import resource, sys; from medsam_rt.tools.cli import main; "
        "soft = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
        "sys.exit(main(sys.argv[2:]))"
    )
    # the interpreter with numpy, Pillow and onnxruntime imported maps ~1.2 GB of address space; +60 MB is less
    # than the image (36 MB) twice with Pillow's buffers
    probe = subprocess.run(
        [sys.executable, "-c",
         "import medsam_rt.tools.cli, onnxruntime, PIL.Image; print(open('/proc/self/status').read())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    vm = next(int(line.split()[1]) * 1024 for line in probe.stdout.splitlines() if line.startswith("VmSize"))
    argv = ["segment", str(tiny_dir), str(image), "--box", "10,10,5000,5000", "--out", str(tmp_path / "m.png")]
    r = subprocess.run(
        [sys.executable, "-c", code, str(vm + (50 << 20)), *argv, "--max-memory", "100G"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "out of memory" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_onnxruntime_allocation_failure_is_recognised():
    """ONNX Runtime's arena failing to allocate raises its own ``Fail`` (not a MemoryError): the CLI's last line of
    defence recognises it by the real message; another ONNX Runtime failure is not mistaken for it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from medsam_rt.tools.budget import is_allocation_failure

    fill = helper.make_node("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1]))
    graph = helper.make_graph(
        [fill],
        "alloc",
        [helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as huge:  # 16 TiB
        session.run(None, {"s": np.array([1 << 20, 1 << 22], np.int64)})
    assert not isinstance(huge.value, MemoryError) and is_allocation_failure(huge.value)
    with pytest.raises(Exception) as wrong:  # a rank the graph does not take
        session.run(None, {"s": np.array([[1, 2]], np.int64)})
    assert not is_allocation_failure(wrong.value)
    assert is_allocation_failure(MemoryError())
