"""The web page of `medsam-rt serve`: its postprocessing in JavaScript against the library's (node), and the page
in a real headless Chromium (Debian's ``chromium``, driven by Playwright) drawing boxes with the mouse in both
decoder modes, its overlay compared with the library's masks (LiteMedSAM's real weights).

Needs: ``node`` for the first test; ``chromium`` (apt) and ``playwright`` (pip) for the page tests; the vendored
onnxruntime-web (``make -C web``, npm) for the in-browser decoder mode. Each is skipped, with the reason, without.
``MEDSAM_RT_SCREENSHOT=path.png`` also writes the page's screenshot there (docs/serve-screenshot.png).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import postprocess_recipe

from medsam_rt import MedSAM
from medsam_rt.core.postprocess import chain
from medsam_rt.core.preprocess import Preprocessing, resized_shape
from medsam_rt.io.formats import display_range, parse_window, read_scan, to_display

STATIC = Path(__file__).resolve().parents[1] / "medsam_rt" / "tools" / "serve" / "static"
CHROMIUM = os.environ.get("MEDSAM_RT_CHROMIUM", "/usr/bin/chromium")


def _unpack(b64: str, h: int, w: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(b64), np.uint8))[: h * w].reshape(h, w).astype(bool)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# -- upscale.js == medsam_rt.core.postprocess, bit for bit -------------------------------------------------------------


def test_upscale_js_equals_library(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    cases, refs = [], []
    for mode, pad in (("crop_resize", 256), ("upscale_crop_resize", 1024), ("resize", 1024)):
        for h, w, thr in ((128, 128, 0.0), (300, 517, 0.3), (1000, 37, 0.0), (1111, 1500, -0.5)):
            p = postprocess_recipe(mode, pad, thr)
            rs = resized_shape((h, w), p)
            logits = 20 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + rng.normal(0, 3, (256, 256))
            logits = logits.astype(np.float32)
            refs.append(chain(p, rs, (h, w)).mask_crop(logits).dense((h, w)))
            meta = {
                "postprocess": mode,
                "pad_size": [pad, pad],
                "resized_size": list(rs),
                "original_size": [h, w],
                "low_res_size": [256, 256],
                "mask_threshold": thr,
            }
            cases.append({"meta": meta, "logits": base64.b64encode(logits.tobytes()).decode()})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "run.mjs"
    script.write_text(f"""
import {{ makeChain, upscaleMask }} from {json.dumps((STATIC / "upscale.js").as_uri())};
import {{ readFileSync }} from "node:fs";
const out = [];
for (const c of JSON.parse(readFileSync({json.dumps(str(tmp_path / "cases.json"))}))) {{
  const buf = Buffer.from(c.logits, "base64");
  const logits = new Float32Array(buf.buffer, buf.byteOffset, buf.length / 4);
  const m = upscaleMask(makeChain(c.meta), logits);
  const bytes = new Uint8Array(Math.ceil(m.length / 8));
  for (let i = 0; i < m.length; i++) if (m[i]) bytes[i >> 3] |= 128 >> (i & 7);
  out.push(Buffer.from(bytes).toString("base64"));
}}
console.log(JSON.stringify(out));
""")
    res = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for got, ref, case in zip(json.loads(res.stdout), refs, cases, strict=True):
        mask = _unpack(got, *ref.shape)
        assert ref.any() and not ref.all()
        assert (mask == ref).all(), (case["meta"], int((mask != ref).sum()))


def test_scale_boxes_js_equals_library(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from medsam_rt.core.preprocess import scale_boxes

    boxes = np.array([[3.0, 7, 100, 77], [0, 0, 517, 300], [12.5, 9.75, 40.25, 299]])
    rows = []
    for box_scale, box_round in (("longest_side", "floor"), ("per_axis", "none"), ("longest_side", "none")):
        p = Preprocessing(
            resize="longest_side",
            size=256,
            interpolation="area",
            normalize="minmax",
            pad_size=(256, 256),
            postprocess="crop_resize",
            box_scale=box_scale,
            box_round=box_round,
        )
        rs = resized_shape((300, 517), p)
        ref = scale_boxes(boxes, (300, 517), rs, p)
        meta = {
            "original_size": [300, 517],
            "resized_size": list(rs),
            "box_scale": box_scale,
            "box_round": box_round,
            "size": 256,
        }
        rows.append((meta, ref))
    script = tmp_path / "boxes.mjs"
    script.write_text(f"""
import {{ scaleBoxes }} from {json.dumps((STATIC / "upscale.js").as_uri())};
const metas = {json.dumps([m for m, _ in rows])};
console.log(JSON.stringify(metas.map((m) => Array.from(scaleBoxes({json.dumps(boxes.tolist())}, m)))));
""")
    res = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for got, (_, ref) in zip(json.loads(res.stdout), rows, strict=True):
        np.testing.assert_array_equal(np.array(got, np.float32).reshape(-1, 4), ref)


# -- the page in Chromium ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("fastapi")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_server(request, tmp_path_factory):
    from medsam_rt.tools.serve.launch import ServerProcess

    local = os.environ.get("MEDSAM_RT_SERVE_LITE_DIR")
    model_dir = Path(local) if local else request.getfixturevalue("lite_dir")
    with ServerProcess(model_dir, "--threads", "2", log_dir=tmp_path_factory.mktemp("serve-web")) as srv:
        srv.model_dir = model_dir
        yield srv


@pytest.fixture(scope="module")
def fallback_server(page_server, tmp_path_factory):
    """A server whose page finds no vendored onnxruntime-web: the page must fall back to /segment."""
    from medsam_rt.tools.serve.launch import ServerProcess

    env = {"MEDSAM_RT_SERVE_VENDOR": str(tmp_path_factory.mktemp("no-vendor"))}
    with ServerProcess(
        page_server.model_dir, "--threads", "2", env=env, log_dir=tmp_path_factory.mktemp("serve-web")
    ) as srv:
        srv.model_dir = page_server.model_dir
        yield srv


@pytest.fixture(scope="module")
def ct():
    pydicom = pytest.importorskip("pydicom")
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    scan = read_scan(path)
    return path, to_display(scan.values[0], display_range(scan, parse_window("auto")))


def _open(browser, server, path: Path, mode: str):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/?decoder={mode}")
    got = page.evaluate("window.medsam.ready")
    page.set_input_files("#file", str(path))
    page.wait_for_function("window.medsam.state.image !== null && window.medsam.state.bitmaps.size > 0", timeout=90000)
    page.wait_for_timeout(200)
    return page, got, errors


def _drag(page, size: tuple[int, int], start: tuple[float, float], end: tuple[float, float], steps: int = 8):
    """Mouse down at ``start``, moves to ``end``, mouse up (image pixel coordinates)."""
    r = page.locator("#boxes").bounding_box()
    sx, sy = r["width"] / size[1], r["height"] / size[0]
    page.mouse.move(r["x"] + start[0] * sx, r["y"] + start[1] * sy)
    page.mouse.down()
    for i in range(1, steps + 1):
        x = start[0] + (end[0] - start[0]) * i / steps
        y = start[1] + (end[1] - start[1]) * i / steps
        page.mouse.move(r["x"] + x * sx, r["y"] + y * sy)
        page.wait_for_timeout(25)
    page.mouse.up()
    page.evaluate("window.medsam.idle()")


def _check_modes_page(browser, page_server, ct, mode: str, screenshot: Path | None = None, ask: str | None = None):
    """Draw, drag and delete a box on the page asking for decoder ``ask`` (default ``mode``), which must run in
    ``mode``; the overlay is compared with the library's masks."""
    path, image = ct
    page, got, errors = _open(browser, page_server, path, ask or mode)
    if mode == "browser" and got != "browser":
        detail = page.evaluate("window.medsam.state.modeDetail")
        page.close()
        pytest.skip(f"in-browser decoder unavailable: {detail}")
    assert got == mode
    h, w = image.shape[:2]
    model = MedSAM.load(page_server.model_dir, precision="fp32", threads=2)
    emb = model.embed(image)

    _drag(page, (h, w), (45, 40), (75, 65))
    boxes = page.evaluate("window.medsam.boxes()")
    assert boxes == [[45, 40, 75, 65]]
    overlay = _unpack(page.evaluate("window.medsam.overlayMask()"), h, w)
    truth = model.segment(emb, boxes).masks[0]
    dice = _dice(overlay, truth)
    assert dice >= 0.99, (mode, dice)
    if mode == "server":
        assert (overlay == truth).all()  # the server's mask is the library's

    # drag the bottom-right corner of the selected box: box and mask follow
    _drag(page, (h, w), (75, 65), (83, 70), steps=4)
    boxes = page.evaluate("window.medsam.boxes()")
    assert boxes == [[45, 40, 83, 70]]
    overlay = _unpack(page.evaluate("window.medsam.overlayMask()"), h, w)
    assert _dice(overlay, model.segment(emb, boxes).masks[0]) >= 0.99

    timings = page.evaluate("window.medsam.timings()")
    assert len(timings) >= 2 and all(t["mode"] == mode and t["ms"] > 0 for t in timings)
    assert (
        page.locator("#mode")
        .text_content()
        .startswith("decoder: in browser" if mode == "browser" else "decoder: server")
    )
    if ask == "auto" and mode == "server":
        assert "make -C web" in page.evaluate("window.medsam.state.modeDetail")
    # Delete removes the selected box and its mask
    page.keyboard.press("Delete")
    assert page.evaluate("window.medsam.boxes()") == []
    assert not _unpack(page.evaluate("window.medsam.overlayMask()"), h, w).any()

    if screenshot is not None:  # two boxes on the real CT slice
        _drag(page, (h, w), (45, 40), (75, 65))
        _drag(page, (h, w), (37, 5), (83, 48))
        page.mouse.click(1, 1)
        page.screenshot(path=str(screenshot))
    assert errors == []
    page.close()
    return timings


@pytest.mark.browser
def test_page_falls_back_to_server_decoder(browser, fallback_server, ct):
    """Without the vendored onnxruntime-web the page (decoder "auto") decodes on the server: masks equal."""
    _check_modes_page(browser, fallback_server, ct, "server", ask="auto")


@pytest.mark.browser
def test_page_volume_slices_and_nifti_download(browser, fallback_server, tmp_path):
    """A NIfTI volume: scroll to another slice, draw a box there, download the label volume (server decoder)."""
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    scan = read_scan(path)
    page, got, errors = _open(browser, fallback_server, path, "server")
    first = page.evaluate("window.medsam.state.slice")
    assert first == scan.num_slices // 2 and page.locator("#slicebar").is_visible()
    page.locator("#boxes").hover()
    page.keyboard.press("ArrowUp")  # one slice up
    page.wait_for_function(f"window.medsam.state.slice === {first - 1}")
    page.wait_for_timeout(300)
    h, w = scan.image_size
    _drag(page, (h, w), (19, 10), (31, 21), steps=3)
    k = first - 1
    image = to_display(scan.values[k], display_range(scan, parse_window("auto")))
    truth = MedSAM.load(fallback_server.model_dir, precision="fp32", threads=2).predict(image, [[19, 10, 31, 21]])
    overlay = _unpack(page.evaluate("window.medsam.overlayMask()"), h, w)
    assert truth.masks[0].any() and (overlay == truth.masks[0]).all()
    with page.expect_download() as dl:
        page.click("#download")
    target = tmp_path / dl.value.suggested_filename
    dl.value.save_as(target)
    assert target.name == "anatomical-labels.nii.gz"
    vol = np.asarray(nibabel.load(target).dataobj)
    np.testing.assert_array_equal(vol[:, :, k].T, truth.label_image())
    assert int(vol.astype(bool).sum()) == int(truth.masks[0].sum())  # nothing on other slices
    assert errors == []
    page.close()


@pytest.mark.browser
def test_page_with_token(browser, tiny_dir, tmp_path):
    """With --token the page asks for it (401 shown, token field visible); /#token=... lets it work."""
    from medsam_rt.tools.serve.launch import ServerProcess

    with ServerProcess(tiny_dir, "--token", "pagetoken", "--threads", "1", log_dir=tmp_path) as srv:
        page = browser.new_page()
        page.goto(f"{srv.url}/?decoder=server")
        page.evaluate("window.medsam.ready")
        assert page.locator("#token").is_visible() and "token" in page.locator("#status").text_content()
        page.close()
        page = browser.new_page()
        page.goto(f"{srv.url}/?decoder=server#token=pagetoken")
        assert page.evaluate("window.medsam.ready") == "server"
        assert page.evaluate("window.medsam.state.model.auth") is True and not page.locator("#token").is_visible()
        page.close()


@pytest.mark.browser
def test_page_server_decoder_chosen(browser, page_server, ct):
    page, got, _ = _open(browser, page_server, ct[0], "server")
    assert got == "server" and page.evaluate("window.medsam.state.modeDetail") == "chosen"
    page.close()


@pytest.mark.browser
def test_page_browser_decoder(browser, page_server, ct, tmp_path):
    shot = tmp_path / "serve-screenshot.png"
    _check_modes_page(browser, page_server, ct, "browser", screenshot=shot)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDSAM_RT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MEDSAM_RT_SCREENSHOT"])
