"""Bad input, systematically: property-based tests (hypothesis) over images and boxes, and a fuzz pass over the
file readers with truncated and bit-flipped files. Every outcome is a correct result or a typed
:mod:`medsam_rt.errors` exception; never another exception, a hang, a memory blow-up or a wrong-shaped result.
The long versions are marked ``soak``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import rng_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_reliability import soak  # noqa: F401 - the fixture that gates the long tier

from medsam_rt import InvalidBoxError, InvalidImageError, MedSAM
from medsam_rt.core.postprocess import upscale_logits
from medsam_rt.core.preprocess import Preprocessing, preprocess_image, resized_shape, to_rgb_uint8
from medsam_rt_export.checkpoints import MEDSAM_ORIGINAL_PREPROCESSING
from medsam_rt_export.hf import preprocessing_from_processor
from medsam_rt_export.lite import LITE_PREPROCESSING

#: The three recipes the exporter writes (README "The model directory"), as it declares them.
RECIPES = {
    "hf": Preprocessing.from_dict(preprocessing_from_processor({})),
    "lite": Preprocessing.from_dict(LITE_PREPROCESSING),
    "original": Preprocessing.from_dict(MEDSAM_ORIGINAL_PREPROCESSING),
}

DTYPES = [
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
]
SHORT = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def images(draw, max_side: int = 40) -> np.ndarray:
    """Arrays of every supported dtype and channel count: random, constant or extreme values, NaN/Inf in floats,
    1xN and Nx1 strips. Float magnitudes stay below 1e300 (see test_float_span_beyond_float64)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if draw(st.integers(0, 4)) == 0:
        h, w = draw(st.sampled_from([(1, 1), (1, 1500), (1500, 1), (2, 777), (1, 2)]))
    else:
        h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    shape = (h, w, *draw(st.sampled_from([(), (1,), (3,), (4,)])))
    if dtype.kind == "f":
        big = 1e300 if dtype.itemsize == 8 else None
        elements = st.floats(
            -big if big else None, big, allow_nan=False, allow_infinity=False, width=8 * dtype.itemsize
        )
        if draw(st.booleans()):
            elements = st.one_of(elements, st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        elements = hnp.from_dtype(dtype)
    kind = draw(st.sampled_from(["random", "constant", "extremes"]))
    if kind == "constant":
        return np.full(shape, draw(elements), dtype)
    if kind == "extremes" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.where(np.indices(shape).sum(axis=0) % 2 == 0, info.min, info.max).astype(dtype)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def check_intake(image: np.ndarray) -> np.ndarray | None:
    """to_rgb_uint8 + every recipe's preprocessing: a typed error, or the contract's shapes and finite values."""
    try:
        rgb = to_rgb_uint8(image)
    except InvalidImageError:
        assert image.dtype.kind == "f" and not np.isfinite(image.astype(np.float64)).all(), image.dtype
        return None
    assert image.dtype.kind != "f" or np.isfinite(image.astype(np.float64)).all(), "NaN/Inf accepted"
    h, w = image.shape[:2]
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    if image.ndim == 2 or image.shape[2] in (1, 3):
        if (image == image.flat[0]).all():
            assert (rgb == rgb.flat[0]).all(), "a constant image must stay constant"
        if image.dtype == np.uint8:
            np.testing.assert_array_equal(rgb, np.broadcast_to(image.reshape(h, w, -1), (h, w, 3)))
    for name, p in RECIPES.items():
        pixels, resized = preprocess_image(rgb, p)
        assert pixels.shape == (1, 3, *p.pad_size) and pixels.dtype == np.float32, name
        assert np.isfinite(pixels).all(), name
        assert resized == resized_shape((h, w), p) and 1 <= min(resized) and max(resized) <= p.size, name
        logits = np.random.default_rng(0).standard_normal((2, 256, 256)).astype(np.float32)
        full = upscale_logits(logits, p, resized, (h, w))
        assert full.shape == (2, h, w) and np.isfinite(full).all(), name
    return rgb


@SHORT
@given(image=images())
def test_image_intake_property(image):
    check_intake(image)


@pytest.mark.soak
@LONG
@given(image=images(max_side=300))
def test_image_intake_property_long(image, soak):  # noqa: F811
    check_intake(image)


def test_float_span_beyond_float64():
    rgb = to_rgb_uint8(np.array([[-1e308, 0.0, 1e308]]))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])


# -- end to end through a model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return MedSAM.load(tiny_dir, precision="fp32", cache=False)


def check_embed_segment(model: MedSAM, image: np.ndarray) -> None:
    try:
        emb = model.embed(image)
    except InvalidImageError:
        assert image.dtype.kind == "f" and not np.isfinite(image.astype(np.float64)).all()
        return
    h, w = image.shape[:2]
    assert emb.original_size == (h, w) and emb.embeddings.shape[2:] == (64, 64)
    assert np.isfinite(emb.embeddings).all()
    res = model.segment(emb, [[0, 0, w, h], [0, 0, max(w / 2, 0.5), max(h / 2, 0.5)]])
    assert res.masks.shape == res.probs.shape == (2, h, w) and res.masks.dtype == bool
    assert np.isfinite(res.probs).all() and ((0 <= res.probs) & (res.probs <= 1)).all()
    assert res.scores.shape == (2,) and np.isfinite(res.scores).all()
    # masks are the exact (float64) chain's; probs the float32 one's: they may differ only within float32 rounding
    # of the threshold (logit 0, probability 0.5)
    differ = res.masks != (res.probs > 0.5)
    assert (np.abs(res.probs[differ] - 0.5) <= 1e-6).all(), res.probs[differ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images())
def test_embed_and_segment_property(tiny, image):
    check_embed_segment(tiny, image)


@pytest.mark.soak
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images(max_side=200))
def test_embed_and_segment_property_long(tiny, image, soak):  # noqa: F811
    check_embed_segment(tiny, image)


# -- boxes ------------------------------------------------------------------------------------------------------------

BOX_IMAGE = (37, 53)  # H, W


@pytest.fixture(scope="module")
def box_embedding(tiny):
    return tiny.embed(rng_image((*BOX_IMAGE, 3), seed=9))


coords = st.one_of(
    st.floats(-60, 120),  # inside, outside, negative
    st.sampled_from([0.0, 37.0, 53.0, 1e-9, 53.0 + 1e-9, -1e-9]),  # on and just off the edges
    st.floats(allow_nan=True, allow_infinity=True),  # NaN, Inf, huge
)


@st.composite
def box_sets(draw):
    n = draw(st.integers(0, 6))
    if draw(st.booleans()):  # mostly valid boxes, some degenerate
        h, w = BOX_IMAGE
        rows = []
        for _ in range(n):
            x0, x1 = sorted(draw(st.floats(0, w)) for _ in range(2))
            y0, y1 = sorted(draw(st.floats(0, h)) for _ in range(2))
            rows.append([x0, y0, x1, y1])
        return np.array(rows, np.float64).reshape(n, 4)
    return np.array([[draw(coords) for _ in range(4)] for _ in range(n)], np.float64).reshape(n, 4)


def _valid(boxes: np.ndarray) -> bool:
    h, w = BOX_IMAGE
    x0, y0, x1, y1 = boxes.T
    return (
        len(boxes) > 0
        and np.isfinite(boxes).all()
        and bool(((x1 > x0) & (y1 > y0) & (x0 >= 0) & (y0 >= 0) & (x1 <= w) & (y1 <= h)).all())
    )


def check_boxes(model: MedSAM, emb, boxes: np.ndarray) -> None:
    for given_as in (boxes, boxes.tolist(), boxes.astype(np.float32)):
        try:
            res = model.segment(emb, given_as)
        except InvalidBoxError:
            assert not _valid(np.asarray(given_as, np.float64).reshape(-1, 4)), boxes
            continue
        assert _valid(np.asarray(given_as, np.float64).reshape(-1, 4)), f"accepted invalid boxes {boxes!r}"
        n = len(boxes)
        assert res.masks.shape == res.probs.shape == (n, *BOX_IMAGE) and res.scores.shape == (n,)
        assert res.low_res_logits.shape == (n, 256, 256) and np.isfinite(res.probs).all()
        assert np.isfinite(res.scores).all()


@SHORT
@given(boxes=box_sets())
def test_boxes_property(tiny, box_embedding, boxes):
    check_boxes(tiny, box_embedding, boxes)


@pytest.mark.soak
@LONG
@given(boxes=box_sets())
def test_boxes_property_long(tiny, box_embedding, boxes, soak):  # noqa: F811
    check_boxes(tiny, box_embedding, boxes)


@pytest.mark.parametrize(
    "boxes",
    [[], np.zeros((0, 4)), [1, 2, 3], [[1, 2, 3, 4, 5]], "1,2,3,4", {"x0": 1}, None, [[0, 0, 1, np.nan]], object()],
    ids=["empty-list", "N=0", "three", "five", "string", "dict", "None", "nan", "object"],
)
def test_malformed_boxes_are_typed_errors(tiny, box_embedding, boxes):
    with pytest.raises(InvalidBoxError):
        tiny.segment(box_embedding, boxes)


def test_integer_box_beyond_float_range():
    with pytest.raises(InvalidBoxError):
        from medsam_rt.core.preprocess import validate_boxes

        validate_boxes([0, 0, 10**400, 5], BOX_IMAGE)


# -- file readers: truncated and bit-flipped files --------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import numpy as np
    from medsam_rt.errors import MedSAMError
    from medsam_rt.core.preprocess import to_rgb_uint8
    from READER_MODULE import READER_NAME as read

    def image(path):  # what embed() does with a path
        arr = read(path)
        rgb = to_rgb_uint8(arr)
        return isinstance(arr, np.ndarray) and rgb.shape[:2] == arr.shape[:2]

    def scan(path):  # what 'medsam-rt segment' does with a DICOM/NIfTI file: read, window, intake
        from medsam_rt.io.formats import display_range, to_display
        s = read(path)
        v = s.values
        if not (isinstance(v, np.ndarray) and v.ndim in (3, 4) and v.shape[0] >= 1):
            return False
        rgb = to_rgb_uint8(to_display(v[0], display_range(s)))
        return rgb.shape[:2] == v.shape[1:3]

    check = MODE
    for line in sys.stdin:
        path = line.strip()
        print(json.dumps({"start": path}), flush=True)
        t = time.perf_counter()
        try:
            outcome = "ok" if check(path) else "bad-result"
        except MedSAMError as exc:
            outcome = "error:" + type(exc).__name__
        except MemoryError:
            outcome = "crash:MemoryError"
        except Exception as exc:
            outcome = f"crash:{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:200]}"
        with open("/proc/self/status") as fh:  # VmHWM: this process's peak (ru_maxrss survives exec)
            peak = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM")) / 1024
        row = {"path": path, "outcome": outcome, "s": time.perf_counter() - t, "peak_mib": peak}
        print(json.dumps(row), flush=True)
    """
)
MEMORY_LIMIT = 6 * 2**30  # address space of the worker: a reader that tries to allocate more fails loudly
CASE_SECONDS = 10.0  # slower than this for one file is a hang
PEAK_MIB = 2048  # resident peak of the worker over all cases


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_seeds(folder: Path) -> list[Path]:
    """Valid PNG/TIFF/JPEG files: scikit-image's shipped samples and generated ones of every bit depth and mode."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    seeds = []
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        for name in ("camera.png", "logo.png", "multipage.tif", "multipage_rgb.tif", "chessboard_GRAY.png"):
            if (data / name).is_file():
                seeds.append(data / name)
    except ImportError:
        pass
    gray = rng_image((61, 83), seed=1)
    made = {
        "gray16.png": (Image.fromarray(rng_image((61, 83), np.uint16)), {}),
        "rgb.png": (Image.fromarray(rng_image((40, 50, 3))), {}),
        "rgba.png": (Image.fromarray(rng_image((40, 50, 4))), {}),
        "palette.png": (Image.fromarray(gray).convert("P"), {}),
        "la.png": (Image.fromarray(gray).convert("LA"), {}),
        "bilevel.png": (Image.fromarray(gray > 128), {}),
        "gray16.tif": (Image.fromarray(rng_image((61, 83), np.uint16)), {}),
        "float32.tif": (Image.fromarray(rng_image((61, 83), np.float32)), {}),
        "int32.tif": (Image.fromarray(rng_image((33, 20), np.uint16).astype(np.int32)), {}),
        "rgb_lzw.tif": (Image.fromarray(rng_image((40, 50, 3))), {"compression": "tiff_lzw"}),
        "gray_deflate.tif": (Image.fromarray(gray), {"compression": "tiff_adobe_deflate"}),
        "gray_packbits.tif": (Image.fromarray(gray), {"compression": "packbits"}),
        "rgb.jpg": (Image.fromarray(rng_image((64, 48, 3))), {"quality": 90}),
        "rgb.bmp": (Image.fromarray(rng_image((30, 20, 3))), {}),
    }
    for name, (img, kwargs) in made.items():
        img.save(folder / name, **kwargs)
        seeds.append(folder / name)
    # headers that promise far more pixels than the file holds (memory must stay bounded)
    (folder / "claims_20000x20000.png").write_bytes(_png(20000, 20000, 8, 0, b"\x00" * 100))
    (folder / "claims_65535x1.png").write_bytes(_png(65535, 1, 16, 0, b"\x00" * 50))
    return [*seeds, folder / "claims_20000x20000.png", folder / "claims_65535x1.png"]


DICOM_SEEDS = (
    "CT_small.dcm",  # int16 + rescale, CT
    "MR_small.dcm",
    "MR_small_RLE.dcm",  # RLE-compressed (pydicom decodes it natively)
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "liver_1frame.dcm",
    "rtdose_1frame.dcm",  # DoseGridScaling
    "emri_small.dcm",  # multi-frame
    "SC_rgb_rle_2frame.dcm",  # colour, 2 frames
    "SC_ybr_full_422_uncompressed.dcm",  # YBR colour space
    "examples_palette.dcm",
    "JPEG-lossy.dcm",  # compressed: needs a decoder plug-in, else a named transfer syntax
    "no_meta.dcm",
)
NIFTI_SEEDS = ("anatomical.nii", "example4d.nii.gz", "standard.nii.gz", "example_nifti2.nii.gz")


def scan_seeds() -> list[Path]:
    """The DICOM files shipped with pydicom and NIfTI volumes shipped with nibabel (those present)."""
    seeds = []
    for module, folder, names in (
        ("pydicom", ("data", "test_files"), DICOM_SEEDS),
        ("nibabel", ("tests", "data"), NIFTI_SEEDS),
    ):
        try:
            root = Path(__import__(module).__file__).parent.joinpath(*folder)
        except ImportError:
            continue
        seeds += [root / n for n in names if (root / n).is_file()]
    return seeds


def mutants(seeds: list[Path], folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` damaged copies of the seeds: truncated anywhere (mostly early: headers), bits flipped (mostly in
    the first 512 bytes), byte runs overwritten or duplicated."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(count):
        src = seeds[k % len(seeds)]
        data = bytearray(src.read_bytes())
        kind = ("truncate", "flip", "overwrite", "duplicate")[k % 4]
        if kind == "truncate":
            cut = int(rng.integers(0, min(len(data), 600))) if rng.random() < 0.6 else int(rng.integers(0, len(data)))
            data = data[:cut]
        elif kind == "flip":
            head = min(len(data), 512) if rng.random() < 0.7 else len(data)
            for _ in range(int(rng.integers(1, 17))):
                data[int(rng.integers(0, head))] ^= 1 << int(rng.integers(0, 8))
        elif kind == "overwrite":
            at = int(rng.integers(0, len(data)))
            run = int(rng.integers(1, 9))
            data[at : at + run] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80], run).astype(np.uint8).tolist())
        else:
            at, run = int(rng.integers(0, len(data))), int(rng.integers(1, 64))
            data[at:at] = data[at : at + run]
        path = folder / f"{k:05d}-{kind}-{src.name}"
        path.write_bytes(bytes(data))
        out.append(path)
    return out


IMAGE_READER = "medsam_rt.core.images:read_image"
SCAN_READER = "medsam_rt.io.formats:read_scan"


def fuzz_files(paths: list[Path], reader: str = IMAGE_READER, timeout: float = 600) -> dict:
    """Read every file in a worker process (address space limited); the outcome counts, slowest case, peak RSS.

    ``reader`` is ``module:function``: an image reader (returns an array, fed to ``to_rgb_uint8``) or
    :data:`SCAN_READER` (returns a Scan, windowed for display as the CLI does, then ``to_rgb_uint8``).
    """
    module, name = reader.split(":")
    code = (
        WORKER.replace("MEMORY_LIMIT", str(MEMORY_LIMIT))
        .replace("READER_MODULE", module)
        .replace("READER_NAME", name)
        .replace("MODE", "scan" if reader == SCAN_READER else "image")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate("\n".join(map(str, paths)) + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        started = [json.loads(line)["start"] for line in out.splitlines() if '"start"' in line]
        pytest.fail(f"reader hung: no result for {started[-1] if started else '?'} within {timeout} s")
    results = [json.loads(line) for line in out.splitlines() if '"outcome"' in line]
    assert proc.returncode == 0 and len(results) == len(paths), f"worker died (rc {proc.returncode}): {err[-2000:]}"
    slowest = max(results, key=lambda r: r["s"])
    peaks = [r["peak_mib"] for r in results]
    jump = max(range(len(results)), key=lambda i: peaks[i] - (peaks[i - 1] if i else 0))
    return {
        "cases": len(results),
        "outcomes": dict(Counter(r["outcome"].split(": ")[0] for r in results)),
        "crashes": [
            (Path(r["path"]).name, r["outcome"]) for r in results if not r["outcome"].startswith(("ok", "error:"))
        ],
        "slowest_s": round(slowest["s"], 3),
        "slowest_case": Path(slowest["path"]).name,
        "peak_rss_mib": round(max(peaks), 1),
        "peak_case": Path(results[jump]["path"]).name,
        "by_file": {Path(r["path"]).name: r["outcome"] for r in results},
    }


def check_fuzz(figures: dict) -> None:
    print(f"file fuzz: { {k: v for k, v in figures.items() if k != 'by_file'} }")
    assert not figures["crashes"], figures["crashes"][:20]
    assert figures["slowest_s"] < CASE_SECONDS, figures
    assert figures["peak_rss_mib"] < PEAK_MIB, figures


def test_image_seeds_are_read(tmp_path):
    seeds = image_seeds(tmp_path / "seeds")
    figures = fuzz_files(seeds)
    # all but the two lying headers and skimage's multipage_rgb.tif (planar RGB: Pillow cannot identify it)
    unreadable = 3 if any(s.name == "multipage_rgb.tif" for s in seeds) else 2
    assert figures["outcomes"] == {"ok": len(seeds) - unreadable, "error:InvalidImageError": unreadable}, figures
    check_fuzz(figures)


def test_fuzz_image_files_short(tmp_path):
    seeds = image_seeds(tmp_path / "seeds")
    check_fuzz(fuzz_files(mutants(seeds, tmp_path / "mutants", 400)))


def _tiff_with_rows(rows: int) -> bytes:
    """A 61x83 uint16 TIFF (one strip) whose ImageLength tag says ``rows``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(61 * 83, dtype=np.uint16).reshape(61, 83)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 257:  # ImageLength, a LONG
            struct.pack_into("<HHII", data, at, 257, 4, 1, rows)
    return bytes(data)


def test_tiff_header_claiming_rows_its_data_lacks(tmp_path):
    """Found by the long fuzz: one flipped bit in a 10 KB TIFF's ImageLength (61 -> 1048637) made read_image
    return a 1048637x83 mostly-zero image and to_rgb_uint8 peak at 2.2 GB."""
    from medsam_rt.core.images import read_image

    (tmp_path / "lying.tif").write_bytes(_tiff_with_rows(1048637))
    with pytest.raises(InvalidImageError):
        read_image(tmp_path / "lying.tif")


def test_dicom_with_a_malformed_number(tmp_path, medical_seeds):
    """Found by the long fuzz: a DS (decimal string) value that is not a number, here RescaleSlope."""
    from medsam_rt.io.formats import read_scan

    data = bytearray(next(p for p in medical_seeds if p.name == "CT_small.dcm").read_bytes())
    at = data.find(b"\x28\x00\x53\x10DS\x02\x00")  # (0028,1053) RescaleSlope, DS, 2 bytes: "1 "
    data[at + 8 : at + 10] = b"1\x7f"
    (tmp_path / "bad_slope.dcm").write_bytes(bytes(data))
    with pytest.raises(InvalidImageError):
        read_scan(tmp_path / "bad_slope.dcm")


@pytest.mark.soak
def test_fuzz_image_files_long(tmp_path, soak):  # noqa: F811
    seeds = image_seeds(tmp_path / "seeds")
    check_fuzz(fuzz_files(mutants(seeds, tmp_path / "mutants", 6000, seed=1), timeout=1800))


@pytest.fixture(scope="module")
def medical_seeds():
    pytest.importorskip("medsam_rt.io.formats")
    seeds = scan_seeds()
    if not seeds:
        pytest.skip("pydicom / nibabel not installed")
    return seeds


#: Shipped samples medsam-rt does not read, and why (every other seed must read and display).
UNREADABLE_SEEDS = {
    "example4d.nii.gz": "error:InvalidImageError",  # 4-D
    "example_nifti2.nii.gz": "error:InvalidImageError",  # 4-D
    "no_meta.dcm": "error:InvalidImageError",  # no DICOM file meta (pydicom refuses it without force=True)
    "JPEG-lossy.dcm": "error:InvalidImageError|ok",  # needs a JPEG decoder plug-in (pylibjpeg/GDCM), if absent
    # colour DICOM under the default window: display_range('auto') picks 'percentile' (reported)
    "SC_rgb_rle_2frame.dcm": "error:InvalidWindowError|ok",
    "SC_ybr_full_422_uncompressed.dcm": "error:InvalidWindowError|ok",
}


def test_scan_seeds_are_read(medical_seeds):
    figures = fuzz_files(medical_seeds, SCAN_READER)
    check_fuzz(figures)
    for name, outcome in figures["by_file"].items():
        assert outcome in UNREADABLE_SEEDS.get(name, "ok").split("|"), (name, outcome)


def test_colour_dicom_displays_with_the_default_window(medical_seeds):
    from medsam_rt.io.formats import display_range, read_scan

    colour = [p for p in medical_seeds if p.name.startswith("SC_")]
    assert colour
    for path in colour:
        scan = read_scan(path)
        assert display_range(scan) is None  # kept as it is, like a colour PNG


def test_fuzz_dicom_nifti_files_short(tmp_path, medical_seeds):
    check_fuzz(fuzz_files(mutants(medical_seeds, tmp_path / "mutants", 400), SCAN_READER))


@pytest.mark.soak
def test_fuzz_dicom_nifti_files_long(tmp_path, medical_seeds, soak):  # noqa: F811
    check_fuzz(fuzz_files(mutants(medical_seeds, tmp_path / "mutants", 5000, seed=1), SCAN_READER, timeout=1800))


def test_fuzz_harness_catches_crashes_and_hangs(tmp_path, monkeypatch):
    """The harness itself: an untyped exception is reported as a crash, a reader that blocks as a hang."""
    (tmp_path / "boom.py").write_text(
        "import time\ndef read(p):\n    if p.endswith('hang'):\n        time.sleep(60)\n    raise KeyError(p)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    figures = fuzz_files([tmp_path / "a", tmp_path / "b"], reader="boom:read")
    assert figures["outcomes"] == {"crash:builtins.KeyError": 2} and len(figures["crashes"]) == 2
    with pytest.raises(pytest.fail.Exception, match="reader hung: no result for .*hang"):
        fuzz_files([tmp_path / "x-hang"], reader="boom:read", timeout=5)
