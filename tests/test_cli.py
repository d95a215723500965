"""The CLI: the happy path writes label PNG + overlay; every bad input is one stderr line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import rng_image, run_cli
from PIL import Image

from medsam_rt import MedSAM
from medsam_rt.tools.cli import main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scan.png"
    Image.fromarray(rng_image((150, 220, 3), seed=5)).save(path)
    return path


def test_segment_writes_labels_and_overlay(tiny_dir, image_path, tmp_path, capsys):
    out, fig = tmp_path / "mask.png", tmp_path / "fig.png"
    rc = main(
        [
            "segment",
            str(tiny_dir),
            str(image_path),
            "--box",
            "10,20,120,140",
            "--box",
            "100,10,215,90",
            "--out",
            str(out),
            "--overlay",
            str(fig),
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    labels = np.asarray(Image.open(out))
    assert labels.dtype == np.uint8 and labels.shape == (150, 220)
    model = MedSAM.load(tiny_dir)
    res = model.segment(model.embed(image_path), [[10, 20, 120, 140], [100, 10, 215, 90]])
    np.testing.assert_array_equal(labels, res.label_image())
    assert [m["area_px"] for m in report["masks"]] == [int(m.sum()) for m in res.masks]
    np.testing.assert_allclose([m["score"] for m in report["masks"]], res.scores, atol=1e-4)
    figure = Image.open(fig)
    assert figure.size[1] == 150 and figure.size[0] > 440 and figure.mode == "RGB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "mask.png"]  # no temporary files left


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "export" in r.stdout and "segment" in r.stdout
    r = run_cli("segment", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "X0,Y0,X1,Y1" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("medsam-rt ")


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing image", ["{model}", "{tmp}/nope.png", "--box", "1,1,5,5", "--out", "{tmp}/m.png"], "not found"),
        (
            "not an image",
            ["{model}", "{tmp}/text.png", "--box", "1,1,5,5", "--out", "{tmp}/m.png"],
            "cannot read image",
        ),
        ("box outside", ["{model}", "{img}", "--box", "0,0,500,10", "--out", "{tmp}/m.png"], "outside the 220x150"),
        ("inverted box", ["{model}", "{img}", "--box", "50,10,20,40", "--out", "{tmp}/m.png"], "inverted"),
        ("NaN box", ["{model}", "{img}", "--box", "nan,10,20,40", "--out", "{tmp}/m.png"], "NaN"),
        ("three numbers", ["{model}", "{img}", "--box", "1,2,3", "--out", "{tmp}/m.png"], "expected X0,Y0,X1,Y1"),
        ("text box", ["{model}", "{img}", "--box", "a,b,c,d", "--out", "{tmp}/m.png"], "not four numbers"),
        ("no box", ["{model}", "{img}", "--out", "{tmp}/m.png"], "--box"),
        ("missing model", ["{tmp}/nomodel", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/m.png"], "not found"),
        ("not a model", ["{tmp}", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/m.png"], "manifest.json is missing"),
        ("bad out dir", ["{model}", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/no/m.png"], "does not exist"),
        ("bad suffix", ["{model}", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/m.jpg"], "must end in .png"),
        (
            "no cuda",
            ["{model}", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/m.png", "--device", "cuda"],
            "CUDAExecutionProvider",
        ),
        (
            "bad device",
            ["{model}", "{img}", "--box", "1,1,5,5", "--out", "{tmp}/m.png", "--device", "tpu"],
            "invalid choice",
        ),
    ],
)
def test_segment_errors(tiny_dir, image_path, tmp_path, case, args, message):
    (tmp_path / "text.png").write_text("hello")
    fmt = {"model": str(tiny_dir), "img": str(image_path), "tmp": str(tmp_path)}
    r = run_cli("segment", *[a.format(**fmt) for a in args])
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsam-rt"), (case, r.stderr)
    assert message in lines[0], (case, lines[0])
    assert "Traceback" not in r.stderr and not (tmp_path / "m.png").exists()


def test_output_that_is_a_directory(tiny_dir, image_path, tmp_path):
    (tmp_path / "d.png").mkdir()
    r = run_cli("segment", str(tiny_dir), str(image_path), "--box", "1,1,5,5", "--out", str(tmp_path / "d.png"))
    assert r.returncode == 2 and "is a directory" in r.stderr and r.stderr.count("\n") == 1


def test_export_errors(tmp_path):
    r = run_cli("export", "--model", "flaviagiammarino/medsam-vit-base", "--out", str(tmp_path / "m"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr  # progress line + the error line
    assert "cannot fetch 'flaviagiammarino/medsam-vit-base'" in lines[-1] and "--random-weights" in lines[-1]
    r = run_cli("export", "--quiet", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such directory" in r.stderr
    r = run_cli("export", "--random-weights", "--arch", "huge", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "invalid choice" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_export_cli_end_to_end(tmp_path, image_path):
    r = run_cli("export", "--random-weights", "--arch", "tiny", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "parity ok" in r.stderr and (tmp_path / "m" / "manifest.json").is_file()
    r = run_cli(
        "segment", str(tmp_path / "m"), str(image_path), "--box", "10,10,100,100", "--out", str(tmp_path / "x.png")
    )
    assert r.returncode == 0 and "RANDOM WEIGHTS" in r.stderr and "score" in r.stdout


def test_demo_runs_and_writes_outputs(tiny_dir, tmp_path, capsys):
    assert main(["demo", str(tiny_dir), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "Dice vs truth" in out
    written = sorted(p.name for p in (tmp_path / "demo").iterdir())
    from medsam_rt.tools.samples import validation_set

    n = len(validation_set())
    assert len(written) == 2 * n and sum(name.endswith("_overlay.png") for name in written) == n
