"""DICOM series (medsam_rt.io.series): a series written with pydicom from a NIfTI volume reads back as that volume
with its geometry (shuffled file names, rescale); two series, a missing slice, a duplicate, mixed orientations and
mixed sizes are errors naming the files; an enhanced multi-frame file keeps working; `segment --box3d` on the
series writes labels where the NIfTI source's would be."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsam_rt.io.formats import read_scan
from medsam_rt.io.series import SeriesError, list_series, read_series
from medsam_rt.tools.cli import main

#: An oblique affine (RAS): 0.8 x 0.7 mm pixels, 2.5 mm slices, rotated about two axes.
_c, _s = np.cos(0.3), np.sin(0.3)
ROTATION = np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
)
AFFINE = np.eye(4)
AFFINE[:3, :3] = ROTATION @ np.diag([0.8, 0.7, 2.5])
AFFINE[:3, 3] = [-90.0, 40.0, -120.5]


def lps(v: np.ndarray) -> np.ndarray:
    return np.array([-v[0], -v[1], v[2]])


@pytest.fixture(scope="module")
def nifti_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1500, (48, 40, 7)).astype(np.int16)  # (i, j, k)
    data[10:30, 12:28, 2:6] = 900
    path = tmp_path_factory.mktemp("nifti") / "source.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, AFFINE), path)
    return path


def write_series(
    nifti: Path,
    folder: Path,
    *,
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    names=None,
    skip=(),
) -> list[Path]:
    """One CT slice file per k of the NIfTI: pixel (row j, column i) = voxel (i, j, k), positions from the affine."""
    img = nibabel.load(nifti)
    data, affine = np.asarray(img.dataobj), img.affine
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    row_dir, col_dir = lps(affine[:3, 0]), lps(affine[:3, 1])
    spacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(data.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.Modality, ds.SeriesDescription = "CT", "phantom"
        ds.StudyDate = datetime.date(2026, 1, 1).strftime("%Y%m%d")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in lps((affine @ [0, 0, k, 1])[:3])]
        ds.ImageOrientationPatient = [
            float(v) for v in np.concatenate([row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)])
        ]
        ds.PixelSpacing = spacing
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
        stored = np.rint((data[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.int16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.tobytes()
        name = names(k) if names else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def shuffled(k: int) -> str:
    return f"IMG{(k * 5 + 3) % 11:04d}"  # no extension, names in no slice order


def test_series_reads_back_the_nifti_volume_and_geometry(nifti_path, tmp_path):
    folder = tmp_path / "series"
    write_series(nifti_path, folder, names=shuffled, slope=0.5, intercept=-1024.0)
    (folder / "README.txt").write_text("not a DICOM file")  # skipped in a folder
    scan = read_scan(folder)
    source = read_scan(nifti_path)
    assert scan.kind == "dicom" and scan.modality == "CT" and scan.values.dtype == np.float32
    np.testing.assert_array_equal(scan.values, source.values)  # rescaled back to the source's values
    assert [p.name for p in scan.files] == [shuffled(k) for k in range(7)]  # ordered along the normal
    np.testing.assert_allclose(scan.geometry.affine_ras(), AFFINE, atol=1e-4)
    assert scan.spacing == pytest.approx((0.7, 0.8)) and scan.slice_thickness == pytest.approx(2.5, abs=1e-4)
    assert read_series(sorted(folder.glob("IMG*"))).values.shape == (7, 40, 48)  # a list of files


def test_two_series_are_listed_and_chosen(nifti_path, tmp_path):
    folder = tmp_path / "two"
    write_series(nifti_path, folder, series_uid="1.2.3.4", names=lambda k: f"a{k}.dcm")
    write_series(nifti_path, folder, series_uid="1.2.3.5", names=lambda k: f"b{k}.dcm", skip=(6,))
    with pytest.raises(
        SeriesError, match=r"holds 2 series: 1\.2\.3\.4 \(CT, 'phantom', 7 files\); 1\.2\.3\.5 .*--series"
    ):
        read_scan(folder)
    assert [s.uid for s in list_series(folder)] == ["1.2.3.4", "1.2.3.5"]
    assert read_scan(folder, series="1.2.3.5").num_slices == 6
    with pytest.raises(SeriesError, match="series 9.9 is not in"):
        read_series(folder, series="9.9")


def test_missing_slice_duplicate_mixed_orientation_and_size(nifti_path, tmp_path):
    gap = tmp_path / "gap"
    write_series(nifti_path, gap, skip=(3,))
    with pytest.raises(SeriesError, match=r"5\.000 mm between slice002\.dcm and slice004\.dcm.*1 missing slice"):
        read_series(gap)

    dup = tmp_path / "dup"
    write_series(nifti_path, dup)
    ds = pydicom.dcmread(dup / "slice003.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(dup / "copy.dcm")
    with pytest.raises(
        SeriesError, match=r"duplicate slice position .*(copy\.dcm and slice003\.dcm|slice003\.dcm and copy\.dcm)"
    ):
        read_series(dup)

    mixed = tmp_path / "mixed"
    write_series(nifti_path, mixed)
    ds = pydicom.dcmread(mixed / "slice005.dcm")
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # a coronal slice in an oblique axial series
    ds.save_as(mixed / "slice005.dcm")
    with pytest.raises(SeriesError, match=r"mixed orientations: .* but slice005\.dcm differ"):
        read_series(mixed)

    sized = tmp_path / "sized"
    write_series(nifti_path, sized)
    ds = pydicom.dcmread(sized / "slice001.dcm")
    ds.Rows, ds.Columns = 20, 24
    ds.PixelData = np.zeros((20, 24), np.int16).tobytes()
    ds.save_as(sized / "slice001.dcm")
    with pytest.raises(SeriesError, match=r"differ in size .*20x24: slice001\.dcm"):
        read_series(sized)


def test_instance_number_fallback_and_its_duplicates(nifti_path, tmp_path):
    folder = tmp_path / "nopos"
    for path in write_series(nifti_path, folder, names=shuffled):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(path)
    scan = read_series(folder)
    assert scan.geometry is None and scan.slice_thickness == pytest.approx(2.5)
    np.testing.assert_array_equal(scan.values, read_scan(nifti_path).values)
    ds = pydicom.dcmread(folder / shuffled(2))
    ds.InstanceNumber = 2
    ds.save_as(folder / shuffled(2))
    with pytest.raises(SeriesError, match="duplicate InstanceNumber 2"):
        read_series(folder)


def test_enhanced_multiframe_file_reads_with_per_frame_rescale_and_geometry(nifti_path, tmp_path):
    folder = tmp_path / "frames"
    paths = write_series(nifti_path, folder)
    slices = [pydicom.dcmread(p) for p in paths]
    ds = copy.deepcopy(slices[0])
    ds.NumberOfFrames = len(slices)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, tag)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = slices[0].PixelSpacing, slices[0].SliceThickness
    orient = Dataset()
    orient.ImageOrientationPatient = slices[0].ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, stored = [], []
    for k, s in enumerate(slices):
        item, pos, lut = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = s.ImagePositionPatient
        lut.RescaleSlope, lut.RescaleIntercept, lut.RescaleType = 2.0, float(k), "US"  # per-frame rescale
        item.PlanePositionSequence, item.PixelValueTransformationSequence = [pos], [lut]
        frames.append(item)
        stored.append(s.pixel_array)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(stored).astype(np.int16).tobytes()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    scan = read_scan(path)
    expected = np.stack([a.astype(np.float64) * 2.0 + k for k, a in enumerate(stored)])
    np.testing.assert_array_equal(scan.values, expected)
    np.testing.assert_allclose(scan.geometry.affine_ras(), AFFINE, atol=1e-4)
    assert scan.spacing == pytest.approx((0.7, 0.8)) and scan.slice_thickness == pytest.approx(2.5, abs=1e-4)
    alone = tmp_path / "alone"
    alone.mkdir()
    path.rename(alone / "enhanced.dcm")  # a folder holding one multi-frame file: read as that file
    np.testing.assert_array_equal(read_scan(alone).values, expected)


def test_segment_box3d_on_the_series_lands_where_the_nifti_labels_do(tiny_dir, nifti_path, tmp_path, capsys):
    folder = tmp_path / "series"
    write_series(nifti_path, folder, names=shuffled)
    box = "10,12,1,30,34,5"  # x (columns = i), y (rows = j), slices k
    out_nifti, out_series = tmp_path / "from-nifti.nii.gz", tmp_path / "from-series.nii.gz"
    for source, out in ((nifti_path, out_nifti), (folder, out_series)):
        assert (
            main(
                [
                    "segment",
                    str(tiny_dir),
                    str(source),
                    "--box3d",
                    box,
                    "--window",
                    "0,1000",
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
    a, b = nibabel.load(out_nifti), nibabel.load(out_series)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    assert np.asarray(a.dataobj).any() and a.get_data_dtype() == np.uint8
    npz = tmp_path / "labels.npz"
    assert main(["segment", str(tiny_dir), str(folder), "--box3d", box, "--out", str(npz), "--json"]) == 0
    info = capsys.readouterr().out
    with np.load(npz) as data:
        assert data["segs"].shape == (7, 40, 48) and data["spacing"] == pytest.approx([2.5, 0.7, 0.8], abs=1e-4)
    assert '"voxel_spacing_mm"' in info and '"volume_mm3"' in info


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--box", "1,1,5,5"], "does not combine with --box"),
        (["--slice", "0"], "does not combine with --slice"),
        (["--out", "x.png"], "must end in"),
    ],
)
def test_box3d_cli_errors(tiny_dir, nifti_path, tmp_path, capsys, extra, message):
    args = ["segment", str(tiny_dir), str(nifti_path), "--box3d", "1,1,0,5,5,1", "--out", str(tmp_path / "o.nii.gz")]
    if extra[0] == "--out":
        args[-1] = str(tmp_path / extra[1])
        extra = []
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
