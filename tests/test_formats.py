"""Medical inputs and outputs: DICOM (rescale, MONOCHROME1, frames, windows), NIfTI volumes (slices, axes,
label volumes with the source geometry), 16-bit PNG/TIFF, .npy/.npz/.nii outputs, and their CLI error paths."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from conftest import run_cli, run_cli_peak
from PIL import Image

from medsam_rt import MedSAM
from medsam_rt.errors import InvalidImageError
from medsam_rt.io.formats import (
    InvalidSliceError,
    InvalidWindowError,
    display_range,
    parse_window,
    read_scan,
    to_display,
)
from medsam_rt.io.results import read_npz
from medsam_rt.tools.cli import main
from medsam_rt.tools.progress import Progress

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
NIFTI_DIR = Path(nibabel.__file__).parent / "tests" / "data"
CT = DICOM_DIR / "CT_small.dcm"
MR = DICOM_DIR / "MR_small.dcm"
ANAT = NIFTI_DIR / "anatomical.nii"


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return MedSAM.load(tiny_dir)


# --- DICOM ------------------------------------------------------------------------------------------------------


def test_dicom_rescale_spacing_and_soft_tissue_window():
    ds = pydicom.dcmread(CT)
    scan = read_scan(CT)
    assert scan.kind == "dicom" and scan.modality == "CT" and scan.values.shape == (1, 128, 128)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(scan.values[0], expected)
    assert scan.spacing == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    # soft tissue: level 40, width 400 -> [-160, 240] maps to 0..255
    vr = display_range(scan, "auto")
    assert vr == (-160.0, 240.0) == display_range(scan, parse_window("soft-tissue"))
    hu = np.array([-1000.0, -160.0, 140.0, 240.0, 3000.0, -60.0])
    np.testing.assert_array_equal(to_display(hu, vr), [0, 0, 191, 255, 255, 64])  # 191.25, 63.75
    assert display_range(scan, parse_window("-600,1500")) == (-1350.0, 150.0)
    assert display_range(scan, "bone") == (400 - 900.0, 400 + 900.0)


def test_dicom_file_window_and_mr_percentiles():
    ds = pydicom.dcmread(MR)
    scan = read_scan(MR)
    level, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert scan.file_window == (level, width)
    assert display_range(scan, "auto") == display_range(scan, "file") == (level - width / 2, level + width / 2)
    lo, hi = np.percentile(ds.pixel_array.astype(np.float64), [0.5, 99.5])
    assert display_range(scan, "percentile") == pytest.approx((lo, hi))
    with pytest.raises(InvalidWindowError, match="records no WindowCenter"):
        display_range(read_scan(CT), "file")
    for bad in ("bogus", "40", "40,0", "40,-5", "a,b"):
        with pytest.raises(InvalidWindowError):
            parse_window(bad)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    raw = pydicom.dcmread(MR).pixel_array.astype(np.float64)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.values[0], raw.max() + raw.min() - raw)
    # the file's window follows the flip, so the displayed image equals the MONOCHROME2 display inverted
    mono2 = to_display(raw, display_range(read_scan(MR), "file"))
    mono1 = to_display(scan.values[0], display_range(scan, "file"))
    assert np.abs(mono1.astype(int) - (255 - mono2.astype(int))).max() <= 1


def test_modality_lut_sequence_maps_stored_values(tmp_path):
    """A Modality LUT Sequence (instead of Rescale Slope/Intercept) maps stored values through its table (values
    below the first mapped value take the first entry, above the last the last), then MedSAM's CT window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(CT)
    raw = ds.pixel_array.astype(np.int64)
    first, n = 200, 1800  # stored values 200..1999 are in the table
    table = ((np.arange(n) ** 2) // 1000).astype(np.uint16)  # non-linear: no slope/intercept gives it
    item = Dataset()
    item.LUTDescriptor = [n, first, 16]
    item.ModalityLUTType = "HU"
    item.add_new("LUTData", "US", table.tolist())  # US: 16-bit entries (the descriptor says 16 bits)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.ModalityLUTSequence = Sequence([item])
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    scan = read_scan(path)
    expected = table[np.clip(raw - first, 0, n - 1)]
    np.testing.assert_array_equal(scan.values[0], expected)
    assert raw.min() < first and raw.max() >= first + n  # both clamped ends were exercised
    assert display_range(scan, "auto") == (-160.0, 240.0)  # the CT soft-tissue window, as with a rescale


def test_multiframe_dicom_frames():
    ds = pydicom.dcmread(DICOM_DIR / "rtdose.dcm")
    scan = read_scan(DICOM_DIR / "rtdose.dcm")
    assert scan.num_slices == 15
    scaled = ds.pixel_array * float(ds.DoseGridScaling)
    np.testing.assert_allclose(scan.values, scaled)
    one = read_scan(DICOM_DIR / "rtdose.dcm", frame=3)
    assert one.num_slices == 1
    np.testing.assert_allclose(one.values[0], scaled[3])
    with pytest.raises(InvalidSliceError, match="outside rtdose.dcm's 15 frame"):
        read_scan(DICOM_DIR / "rtdose.dcm", frame=15)


def test_undecodable_dicom_names_the_transfer_syntax():
    with pytest.raises(InvalidImageError, match=r"transfer syntax JPEG-LS .*1\.2\.840\.10008\.1\.2\.4\.8"):
        read_scan(DICOM_DIR / "JPEGLSNearLossless_08.dcm")


def test_truncated_and_fake_dicom(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(CT.read_bytes()[:2000])
    with pytest.raises(InvalidImageError, match="bad.dcm"):
        read_scan(bad)
    fake = tmp_path / "fake.dcm"
    fake.write_text("not dicom")
    with pytest.raises(InvalidImageError, match="fake.dcm"):
        read_scan(fake)


# --- NIfTI ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slices_follow_the_documented_convention(axis):
    data = np.asarray(nibabel.load(ANAT).dataobj, dtype=np.float32)
    scan = read_scan(ANAT, axis=axis)
    assert scan.kind == "nifti" and scan.num_slices == data.shape[axis]
    k = scan.num_slices // 2
    # rows = the higher remaining voxel axis, columns = the lower one
    np.testing.assert_array_equal(scan.values[k], np.take(data, k, axis=axis).T)
    zooms = nibabel.load(ANAT).header.get_zooms()
    rows, cols = sorted({0, 1, 2} - {axis}, reverse=True)
    assert scan.spacing == (zooms[rows], zooms[cols]) and scan.slice_thickness == zooms[axis]


def test_nifti_errors(tmp_path):
    with pytest.raises(InvalidImageError, match="4-D NIfTI"):
        read_scan(NIFTI_DIR / "example4d.nii.gz")
    with pytest.raises(InvalidSliceError, match="--axis"):
        read_scan(ANAT, axis=3)
    trunc = tmp_path / "t.nii"
    trunc.write_bytes(ANAT.read_bytes()[:1000])
    with pytest.raises(InvalidImageError, match="t.nii"):
        read_scan(trunc)


def test_nifti_range_round_trips_with_geometry(tiny, tiny_dir, tmp_path, capsys):
    out, fig = tmp_path / "labels.nii.gz", tmp_path / "grid.png"
    box = [4, 6, 28, 26]
    argv = ["segment", str(tiny_dir), str(ANAT), "--slices", "10:13", "--box", ",".join(map(str, box))]
    assert main([*argv, "--out", str(out), "--overlay", str(fig), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    src, img = nibabel.load(ANAT), nibabel.load(out)
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    assert img.header.get_zooms() == src.header.get_zooms() and img.get_data_dtype() == np.uint8
    labels = np.asarray(img.dataobj)
    scan = read_scan(ANAT)
    vr = display_range(scan)
    for k in range(src.shape[2]):
        if k in (10, 11, 12):
            expected = tiny.segment(tiny.embed(to_display(scan.values[k], vr)), [box]).label_image()
            np.testing.assert_array_equal(labels[:, :, k].T, expected)
        else:
            assert not labels[:, :, k].any()
    assert report["slices"] == [10, 11, 12] and len(report["masks"]) == 3
    zooms = src.header.get_zooms()
    for row in report["masks"]:
        assert row["area_mm2"] == pytest.approx(row["area_px"] * zooms[0] * zooms[1], rel=1e-4)
    total = sum(r["area_mm2"] for r in report["masks"]) * zooms[2]
    assert report["volume_mm3"]["1"] == pytest.approx(total, rel=1e-4)
    assert Image.open(fig).format == "PNG" and Image.open(fig).mode == "RGB"


def test_per_slice_box_file_and_npz(tiny, tiny_dir, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("# slice, x0, y0, x1, y1\n3, 2, 2, 20, 20\n3 10 10 30 24\n7,5,5,25,25\n")
    out = tmp_path / "m.npz"
    assert main(["segment", str(tiny_dir), str(ANAT), "--axis", "1", "--boxes", str(boxes), "--out", str(out)]) == 0
    z = read_npz(out)  # per-mask crops + offsets (the format of medsam_rt.core.masks)
    assert str(np.load(out)["mask_format"]) == "crops" and "masks" not in np.load(out)
    masks = z.dense()
    assert masks.dtype == bool and masks.shape[0] == 3
    np.testing.assert_array_equal(z.slice, [3, 3, 7])
    np.testing.assert_array_equal(z.label, [1, 2, 1])
    scan = read_scan(ANAT, axis=1)
    assert masks.shape[1:] == scan.image_size
    vr = display_range(scan)
    res = tiny.segment(tiny.embed(to_display(scan.values[3], vr)), [[2, 2, 20, 20], [10, 10, 30, 24]])
    np.testing.assert_array_equal(masks[:2], res.masks)
    np.testing.assert_allclose(z.scores[:2], res.scores, atol=1e-6)


# --- 2-D images and outputs -------------------------------------------------------------------------------------


def _gradient16(h=90, w=130):
    y, x = np.mgrid[:h, :w]
    img = (x * 300 + y * 200).astype(np.uint16)
    img[20:60, 30:90] += 20000
    return img


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_files_segment_like_their_arrays(tiny, tiny_dir, tmp_path, fmt):
    img = _gradient16()
    path = tmp_path / f"img16.{fmt}"
    Image.fromarray(img).save(path)
    scan = read_scan(path)
    assert scan.values.dtype == np.uint16 and scan.values.shape == (1, 90, 130)
    np.testing.assert_array_equal(scan.values[0], img)
    out = tmp_path / "m.npy"
    assert main(["segment", str(tiny_dir), str(path), "--box", "25,15,95,65", "--out", str(out), "--quiet"]) == 0
    masks = np.load(out)
    expected = tiny.segment(tiny.embed(img), [[25, 15, 95, 65]]).masks  # min-max to 8 bits, as arrays are
    assert masks.dtype == bool and masks.shape == (1, 90, 130)
    np.testing.assert_array_equal(masks, expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_8bit_png_and_jpeg(tiny_dir, tmp_path, mode):
    rng = np.random.default_rng(1)
    shape = (70, 100) if mode == "L" else (70, 100, len(mode))
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    for ext in ("png", "jpg") if mode != "RGBA" else ("png",):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(arr, mode).save(path)
        out = tmp_path / f"m_{ext}.png"
        assert main(["segment", str(tiny_dir), str(path), "--box", "5,5,60,50", "--out", str(out), "--quiet"]) == 0
        assert np.asarray(Image.open(out)).shape == (70, 100)


def test_dicom_outputs_png_nifti_json_overlay(tiny, tiny_dir, tmp_path, capsys):
    argv = ["segment", str(tiny_dir), str(CT), "--window", "40,400", "--box", "30,30,90,100"]
    assert main([*argv, "--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "f.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main([*argv, "--out", str(tmp_path / "m.nii"), "--quiet"]) == 0
    scan = read_scan(CT)
    expected = tiny.segment(tiny.embed(to_display(scan.values[0], (-160.0, 240.0))), [[30, 30, 90, 100]])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), expected.label_image())
    img = nibabel.load(tmp_path / "m.nii")
    assert img.shape == (128, 128, 1)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0].T, expected.label_image())
    np.testing.assert_allclose(np.diag(img.affine)[:2], scan.spacing[::-1])
    row = report["masks"][0]
    assert row["area_mm2"] == pytest.approx(row["area_px"] * scan.spacing[0] * scan.spacing[1], rel=1e-4)
    fig = Image.open(tmp_path / "f.png")
    assert fig.format == "PNG" and fig.size[1] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "m.nii", "m.png"]
    assert oct(os.stat(tmp_path / "m.png").st_mode & 0o777) != oct(0o600)  # a normal file, not mkstemp's


# --- CLI error paths (subprocess): one line, exit code 2, nothing written ----------------------------------------


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("volume without slice", ["{anat}", "--box", "1,1,5,5"], "choose --slice K or --slices A:B"),
        ("slice out of range", ["{anat}", "--slice", "25", "--box", "1,1,5,5"], "not inside anatomical.nii's 25"),
        ("bad range", ["{anat}", "--slices", "9:3", "--box", "1,1,5,5"], "empty or negative"),
        ("range past the end", ["{anat}", "--slices", "20:30", "--box", "1,1,5,5"], "not inside"),
        ("frame on nifti", ["{anat}", "--frame", "1", "--box", "1,1,5,5"], "--frame is for multi-frame DICOM"),
        ("frame out of range", ["{rtdose}", "--frame", "15", "--box", "1,1,5,5"], "outside rtdose.dcm's 15"),
        ("frame on png", ["{png}", "--frame", "1", "--box", "1,1,5,5"], "--frame applies to multi-frame DICOM"),
        ("unknown window", ["{ct}", "--window", "liver", "--box", "1,1,5,5"], "unknown window 'liver'"),
        ("no file window", ["{ct}", "--window", "file", "--box", "1,1,5,5"], "records no WindowCenter"),
        ("window on colour", ["{rgb}", "--window", "bone", "--box", "1,1,5,5"], "single-channel"),
        ("undecodable", ["{jpegls}", "--box", "1,1,5,5"], "transfer syntax JPEG-LS"),
        ("4-D", ["{nii4d}", "--slice", "0", "--box", "1,1,5,5"], "4-D NIfTI"),
        ("box outside slice", ["{anat}", "--slice", "3", "--box", "0,0,40,40"], "outside the 33x41"),
        ("missing box file", ["{anat}", "--slice", "3", "--boxes", "{tmp}/none.csv"], "not found"),
        ("bad box file", ["{anat}", "--boxes", "{tmp}/bad.csv"], "bad.csv:2: expected"),
        ("box file slice", ["{anat}", "--slice", "3", "--boxes", "{tmp}/slice9.csv"], "names slice 9"),
        ("truncated nifti", ["{tmp}/t.nii", "--slice", "0", "--box", "1,1,5,5"], "cannot read NIfTI"),
    ],
)
def test_medical_cli_errors(tiny_dir, tmp_path, case, args, message):
    (tmp_path / "bad.csv").write_text("1,2,3,4\n1,2,3\n")
    (tmp_path / "slice9.csv").write_text("9,1,1,5,5\n")
    (tmp_path / "t.nii").write_bytes(ANAT.read_bytes()[:500])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "c.png")
    fmt = {
        "anat": str(ANAT),
        "ct": str(CT),
        "rtdose": str(DICOM_DIR / "rtdose.dcm"),
        "jpegls": str(DICOM_DIR / "JPEGLSNearLossless_08.dcm"),
        "nii4d": str(NIFTI_DIR / "example4d.nii.gz"),
        "png": str(tmp_path / "g.png"),
        "rgb": str(tmp_path / "c.png"),
        "tmp": str(tmp_path),
    }
    out = tmp_path / "out.nii.gz"
    r = run_cli("segment", str(tiny_dir), *[a.format(**fmt) for a in args], "--out", str(out))
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsam-rt"), (case, r.stderr)
    assert message in lines[0], (case, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_png_output_refuses_a_range(tiny_dir, tmp_path):
    r = run_cli(
        "segment", str(tiny_dir), str(ANAT), "--slices", "1:3", "--box", "1,1,5,5", "--out", str(tmp_path / "m.png")
    )
    assert r.returncode == 2 and "a PNG holds one slice" in r.stderr and r.stderr.count("\n") == 1


# --- info, help, progress ---------------------------------------------------------------------------------------


def test_info_describes_the_model(tiny_dir):
    r = run_cli("info", str(tiny_dir))
    assert r.returncode == 0, r.stderr
    assert "usable variants" in r.stdout and "parity vs PyTorch passed" in r.stdout and "pad_size" in r.stdout
    assert "RANDOM WEIGHTS" in r.stdout
    r = run_cli("info", str(tiny_dir), "--json")
    assert json.loads(r.stdout)["format"] == "medsam-rt"
    r = run_cli("info", "/nonexistent/dir")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr


def test_every_subcommand_help_has_examples_or_description():
    for cmd in ("export", "segment", "info", "demo", "bench"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and len(r.stdout) > 300, cmd
        assert "examples:" in r.stdout, cmd


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_tty():
    tty, pipe = _Tty(), io.StringIO()
    with Progress(4, "slices", stream=tty) as bar:
        bar.update(note="slice 1")
        bar.update(2, note="slice 3")
    assert "slices [" in tty.getvalue() and "3/4" in tty.getvalue() and tty.getvalue().endswith("\n")
    with Progress(4, "slices", stream=pipe) as bar:
        bar.update()
    assert pipe.getvalue() == ""
    with Progress(4, "slices", stream=tty, enabled=False) as bar:
        bar.update()
    quiet = _Tty()
    with Progress(4, "x", stream=quiet, enabled=False) as bar:
        bar.update()
    assert quiet.getvalue() == ""


@pytest.mark.full
def test_large_image_within_bounded_memory(tiny_dir, tmp_path):
    """A 10000x10000 scan with 4 boxes: masks as crops (no float probabilities for every pixel), label image in
    row blocks."""
    y, x = np.ogrid[:10000, :10000]
    Image.fromarray((((x - 5000) ** 2 + (y - 5000) ** 2 < 2000**2) * 150 + 50).astype(np.uint8)).save(
        tmp_path / "big.png"
    )
    boxes = ["2800,2800,7200,7200", "100,100,3000,3000", "10,10,9000,9000", "5000,5000,9990,9990"]
    argv = ["segment", str(tiny_dir), str(tmp_path / "big.png"), *(a for b in boxes for a in ("--box", b))]
    rc, peak, err = run_cli_peak(*argv, "--out", str(tmp_path / "m.png"), "--quiet")
    assert rc == 0, err
    peak_gib = peak / 2**30
    # the image (100 MB), its RGB copy (300 MB), 4 mask crops (the random model's masks cover nearly the whole
    # image: 400 MB), the label image (100 MB) with row-block temporaries, the sessions: 1.3 GB measured (2.05 GB
    # with dense masks and whole-image float planes; ~4 GB for 2 boxes before chunked masks)
    assert peak_gib < 2.0, peak_gib
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (10000, 10000)
