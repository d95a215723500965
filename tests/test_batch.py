"""``medsam-rt batch``: a job list of real and phantom images (PNG 8/16-bit, TIFF, DICOM, a NIfTI slice), two
volumes (NIfTI, 3-D boxes), two CVPR24 npz cases and broken entries, run on the local and the ray engines with the
real LiteMedSAM weights: every output equals the file ``medsam-rt segment`` (``challenge`` for the cases) writes
for the same job, the broken entries are reported and the rest completes, and a run SIGKILLed halfway and
started again ends with the same outputs and no partial file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel
import numpy as np
import pytest
from conftest import cli_command, run_cli
from PIL import Image

from medsam_rt.core.providers import physical_cores
from medsam_rt.core.volume import ellipsoid_phantom
from medsam_rt.tools.cli import main
from medsam_rt.tools.samples import ellipse_phantom, phantoms, real_samples
from medsam_rt.tools.scale import BatchUsageError, JobListError, read_jobs, run_batch
from medsam_rt.tools.scale.batch import FAILURES_FILE, LOCK_FILE, _lock

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PRECISION = ["--precision", "fp32"]
BROKEN = {  # id -> what its failure message says
    "missing": "image file not found",
    "outside": "outside the",
    "line-14": "not JSON",
    "typo": "unknown key",
    "corrupt": "cannot read image",
    "noslice": 'give "slice"',
}


def _nifti(path: Path, volume: np.ndarray) -> None:
    """A ``(D, H, W)`` volume as NIfTI whose axis-2 slices read back as ``volume[z]`` (voxel (i, j) = pixel (x, y))."""
    nibabel.save(
        nibabel.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.diag([0.8, 0.8, 2.0, 1])), path
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Input files and jobs.jsonl (paths relative to it)."""
    import pydicom.data

    d = tmp_path_factory.mktemp("batch-data")
    jobs = []
    for k, s in enumerate(real_samples() + phantoms()):
        name = f"s{k:02d}" + (".tif" if k == 4 else ".png")
        Image.fromarray(s.image).save(d / name)  # uint16: a 16-bit PNG/TIFF
        jobs.append({"image": name, "boxes": s.boxes.tolist()})
    for seed in range(6):  # more phantoms: two dozen good jobs in all
        s = ellipse_phantom(120 + 8 * seed, 200 - 5 * seed, seed=seed)
        Image.fromarray(s.image).save(d / f"e{seed:02d}.png")
        jobs.append({"image": f"e{seed:02d}.png", "id": f"ellipse-{seed}", "boxes": s.boxes.tolist()})
    ct, mr = pydicom.data.get_testdata_file("CT_small.dcm"), pydicom.data.get_testdata_file("MR_small.dcm")
    jobs.append({"image": ct, "boxes": [[45, 40, 75, 65], [37, 5, 83, 48]], "window": "soft-tissue"})
    jobs.append({"image": mr, "boxes": [[34, 23, 64, 48]]})
    anatomical = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    jobs.append({"image": str(anatomical), "id": "anat-12", "slice": 12, "boxes": [[19, 10, 31, 21]]})
    # two volumes: the real anatomical.nii and an ellipsoid phantom, 3-D boxes
    jobs.append({"image": str(anatomical), "id": "anat-3d", "boxes3d": [[10, 12, 9, 24, 30, 15]]})
    ph = ellipsoid_phantom((12, 96, 112), [((5, 40, 50), (8, 18, 22)), ((7, 60, 75), (6, 12, 14))], seed=2)
    _nifti(d / "phantom3d.nii.gz", ph.volume)
    jobs.append({"image": "phantom3d.nii.gz", "boxes3d": ph.boxes3d.tolist()})
    # two CVPR24 cases (2-D and 3-D), as `medsam-rt challenge` reads them
    cases = d / "cases"
    cases.mkdir()
    two = phantoms()[-1]
    np.savez_compressed(cases / "2DBox_two.npz", imgs=np.repeat(two.image[..., None], 3, 2), boxes=two.boxes)
    np.savez_compressed(cases / "3DBox_ph.npz", imgs=ph.volume, boxes=ph.boxes3d, spacing=np.array(ph.spacing))
    jobs += [{"image": "cases/2DBox_two.npz"}, {"image": "cases/3DBox_ph.npz"}]
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    broken = [
        {"image": "nope.png", "id": "missing", "boxes": [[1, 1, 5, 5]]},
        {"image": "e00.png", "id": "outside", "boxes": [[10, 10, 900, 20]]},
        "{not json",
        {"image": "e01.png", "id": "typo", "boxes": [[1, 1, 5, 5]], "widnow": "bone"},
        {"image": "corrupt.png", "boxes": [[1, 1, 5, 5]]},
        {"image": "phantom3d.nii.gz", "id": "noslice", "boxes": [[1, 1, 5, 5]]},
    ]
    lines = [json.dumps(j) for j in jobs]
    for k, b in enumerate(broken):  # spread among the good ones
        lines.insert(5 * k + 3, b if isinstance(b, str) else json.dumps(b))
    assert lines[13] == "{not json"  # its id is line-14
    (d / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _segment_args(job, d: Path) -> list[str]:
    image = job.image
    args = []
    if job.kind == "volume":
        for b in job.boxes:
            args += ["--box3d", ",".join(f"{v:g}" for v in b)]
    else:
        for b in job.boxes:
            args += ["--box", ",".join(f"{v:g}" for v in b)]
    if job.window != "auto":
        args += ["--window", job.window]
    if job.slice is not None:
        args += ["--slice", str(job.slice)]
    return [image, *args]


@pytest.fixture(scope="module")
def reference(lite_dir, data, tmp_path_factory) -> Path:
    """What ``medsam-rt segment`` writes for each good job (``challenge`` for the npz cases)."""
    ref = tmp_path_factory.mktemp("batch-ref")
    for job in read_jobs(data / "jobs.jsonl"):
        if job.problem is not None or job.id in BROKEN or job.kind == "case":
            continue
        out = ref / job.output_name
        assert (
            main(["segment", str(lite_dir), *_segment_args(job, data), "--out", str(out), "--quiet", *PRECISION]) == 0
        )
    assert main(["challenge", str(lite_dir), str(data / "cases"), str(ref), "--quiet", "--precision", "fp32"]) == 0
    (ref / "efficiency.csv").unlink()
    return ref


def _read(path: Path) -> np.ndarray:
    name = path.name
    if name.endswith(".png"):
        return np.asarray(Image.open(path))
    if name.endswith(".nii.gz"):
        img = nibabel.load(path)
        return np.asarray(img.dataobj), img.affine
    with np.load(path) as z:
        return z["segs"]


def assert_same_outputs(out: Path, ref: Path) -> None:
    made = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != FAILURES_FILE)
    assert made == sorted(p.name for p in ref.iterdir())
    for name in made:
        a, b = _read(out / name), _read(ref / name)
        if isinstance(a, tuple):
            np.testing.assert_array_equal(a[0], b[0], err_msg=name)
            np.testing.assert_array_equal(a[1], b[1], err_msg=name)
            a = a[0]
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
        assert a.max() > 0, name  # every good job found its object(s)


def assert_broken_reported(out: Path) -> None:
    failures = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert {f["id"] for f in failures} == set(BROKEN)
    for f in failures:
        assert BROKEN[f["id"]] in f["error"], f


def test_local_engine_matches_segment_and_reports_broken_jobs(lite_dir, data, reference, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["batch", str(lite_dir), str(data / "jobs.jsonl"), "--out", str(out), "--json", *PRECISION]
    rc = main([*argv, "--workers", "2"])
    assert rc == 1
    summary = json.loads(capsys.readouterr().out)
    good = len(list(reference.iterdir()))
    assert good >= 24
    assert (summary["jobs"], summary["succeeded"], summary["failed"], summary["skipped"]) == (
        good + len(BROKEN),
        good,
        len(BROKEN),
        0,
    )
    assert summary["engine"] == "local" and summary["threads"] == max(1, physical_cores() // 2)
    assert set(summary["stages"]) == {"read", "model", "write", "io"} and summary["stages"]["model"] > 0
    assert_same_outputs(out, reference)
    assert_broken_reported(out)
    # a second run skips every finished job and retries the failed ones
    rc = main(argv)
    summary = json.loads(capsys.readouterr().out)
    assert rc == 1 and (summary["skipped"], summary["failed"], summary["succeeded"]) == (good, len(BROKEN), 0)
    assert_broken_reported(out)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module (starting Ray takes seconds): bounded CPUs, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_engine_matches_segment(local_ray, lite_dir, data, reference, tmp_path):
    out = tmp_path / "out"
    outcomes = []
    summary = run_batch(
        lite_dir, data / "jobs.jsonl", out, engine="ray", workers=2, precision="fp32", on_outcome=outcomes.append
    )
    good = len(list(reference.iterdir()))
    assert (summary.engine, summary.succeeded, summary.failed, summary.skipped) == ("ray", good, len(BROKEN), 0)
    assert len({o.worker for o in outcomes if o.status == "ok"}) == 2  # two actors, each its own process
    assert os.getpid() not in {o.worker for o in outcomes if o.status == "ok"}
    assert_same_outputs(out, reference)
    assert_broken_reported(out)


def test_killed_run_restarts_to_the_same_outputs(lite_dir, data, reference, tmp_path):
    good = [j for j in read_jobs(data / "jobs.jsonl") if j.problem is None and j.id not in BROKEN]
    lines = [json.dumps({"image": j.image, "id": j.id, "boxes": [list(b) for b in j.boxes]}) for j in good[:12]]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = cli_command(
        "batch", str(lite_dir), str(tmp_path / "jobs.jsonl"), "--out", str(out), "--quiet", *PRECISION
    )
    run = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        done = [p for p in out.glob("*.png") if not p.name.startswith(".")] if out.is_dir() else []
        if len(done) >= 4:
            break
        time.sleep(0.05)
    assert run.poll() is None, run.stderr.read().decode()
    os.killpg(run.pid, signal.SIGKILL)  # the driver and its workers, mid-job
    run.wait()
    finished = {p.name for p in out.glob("*.png") if not p.name.startswith(".")}
    assert 4 <= len(finished) < 12
    for name in finished:  # nothing half-written under a final name
        np.testing.assert_array_equal(_read(out / name), _read(reference / name))
    # started again: the finished jobs are skipped, the temporary files of the killed writes removed
    r = run_cli(*command[3:-3], "--json", *PRECISION, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["skipped"] == len(finished) and summary["succeeded"] == 12 - len(finished)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
    for job in good[:12]:
        np.testing.assert_array_equal(_read(out / job.output_name), _read(reference / job.output_name))
    assert (out / FAILURES_FILE).read_text() == ""


def test_usage_errors_exit_2(lite_dir, data, tmp_path, capsys):
    jobs = data / "jobs.jsonl"
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps({"image": "a.png", "boxes": [[1, 1, 4, 4]]}) + "\n")
    twice.write_text(twice.read_text() * 2)
    with pytest.raises(JobListError, match=r"lines? 1 and line 2 both write a\.png"):
        read_jobs(twice)
    cases = [
        ([str(lite_dir), str(tmp_path / "nope.jsonl")], "job list not found"),
        ([str(lite_dir), str(twice)], "both write a.png"),
        ([str(tmp_path), str(jobs)], "manifest"),
        ([str(lite_dir), str(jobs), "--workers", "0"], "workers must be an integer >= 1"),
        ([str(lite_dir), str(jobs), "--address", "127.0.0.1:1"], "applies to the ray engine"),
        ([str(lite_dir), str(jobs), "--out", str(jobs)], "is not a folder"),
    ]
    for args, message in cases:
        argv = ["batch", *args] if "--out" in args else ["batch", *args, "--out", str(tmp_path / "o")]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "o").mkdir(exist_ok=True)
    with _lock(tmp_path / "o"), pytest.raises(BatchUsageError, match="another batch run"):
        run_batch(lite_dir, jobs, tmp_path / "o")
