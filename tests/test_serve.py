"""`medsam-rt serve` against real uvicorn processes on loopback ports: every endpoint, masks equal to the
library's (LiteMedSAM's real weights), every error path, auth, size limit, queue limit, expiry, a bounded load.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart); skipped without it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402

from medsam_rt import MedSAM  # noqa: E402
from medsam_rt.io.formats import display_range, parse_window, read_scan, to_display  # noqa: E402
from medsam_rt.tools.serve.launch import Client, ServerProcess, multipart  # noqa: E402


def _ct() -> Path:
    pydicom = pytest.importorskip("pydicom")
    return Path(pydicom.data.get_testdata_file("CT_small.dcm"))


def _nifti() -> Path:
    nibabel = pytest.importorskip("nibabel")
    return Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def _rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, value = 0, False
    for n in rle["counts"]:
        flat[pos : pos + n] = value
        pos, value = pos + n, not value
    assert pos == h * w
    return flat.reshape(w, h).T  # column-major


def _truth(model: MedSAM, path: Path, boxes, k: int = 0, window: str = "auto"):
    scan = read_scan(path)
    image = to_display(scan.values[k], display_range(scan, parse_window(window)))
    return model.segment(model.embed(image), boxes), image


@pytest.fixture(scope="module")
def lite_dir_fp32(request) -> Path:
    """LiteMedSAM's export: ``$MEDSAM_RT_SERVE_LITE_DIR`` when set (a local export, for quick reruns), else the
    shared ``lite_dir`` fixture."""
    local = os.environ.get("MEDSAM_RT_SERVE_LITE_DIR")
    return Path(local) if local else request.getfixturevalue("lite_dir")


@pytest.fixture(scope="module")
def lite_server(lite_dir_fp32, tmp_path_factory):
    with ServerProcess(lite_dir_fp32, "--threads", "2", log_dir=tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(scope="module")
def lite_model(lite_dir_fp32) -> MedSAM:
    return MedSAM.load(lite_dir_fp32, precision="fp32", threads=2)


@pytest.fixture()
def client(lite_server):
    c = Client(lite_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ct_id(lite_server) -> str:
    c = Client(lite_server.url)
    r = c.upload(_ct().read_bytes(), "CT_small.dcm")
    assert r.status == 200, r.data
    return r.json()["id"]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# -- endpoints and masks ------------------------------------------------------------------------------------------


def test_upload_dicom_and_segment_equal_library(client, ct_id, lite_model):
    info = client.request("GET", f"/v1/images/{ct_id}").json()
    assert (info["width"], info["height"], info["slices"], info["kind"]) == (128, 128, 1, "dicom")
    assert info["window"] == [-160.0, 240.0]  # CT_small records WindowCenter 40 / WindowWidth 400
    boxes = [[45, 40, 75, 65], [37, 5, 83, 48]]
    r = client.request("POST", f"/v1/images/{ct_id}/segment", json_body={"boxes": boxes, "rle": True})
    assert r.status == 200, r.data
    body = r.json()
    truth, _ = _truth(lite_model, _ct(), boxes)
    labels = _decode_png(body["labels_png"])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, truth.label_image())
    np.testing.assert_allclose(body["scores"], truth.scores, rtol=0, atol=1e-6)
    assert body["areas"] == [int(a) for a in truth.crops.areas()] and min(body["areas"]) > 50
    for rle, mask in zip(body["rle"], truth.masks, strict=True):
        assert rle["size"] == [128, 128]
        np.testing.assert_array_equal(_rle_decode(rle), mask)
    assert set(body["ms"]) >= {"queue", "embed", "decode", "labels", "rle", "total"}
    assert body["ms"]["embed"] < 50  # embedded at upload: a cache hit now


def test_png_upload_sixteen_bit_and_window(client, lite_model):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:180, 0:240]
    img = 20000 + 15000 * np.exp(-((yy - 90) ** 2 + (xx - 110) ** 2) / 900.0) + rng.normal(0, 300, (180, 240))
    img = img.clip(0, 65535).astype(np.uint16)
    data = _png_bytes(img)
    r = client.upload(data, "phantom16.png")
    assert r.status == 200, r.data
    info = r.json()
    assert (info["width"], info["height"], info["kind"]) == (240, 180, "image")
    assert info["window"] == [float(img.min()), float(img.max())]  # min-max for 16-bit images
    box = [[70, 50, 150, 130]]
    body = client.request("POST", f"/v1/images/{info['id']}/segment", json_body={"boxes": box}).json()
    scan_img = to_display(img, (float(img.min()), float(img.max())))
    truth = lite_model.segment(lite_model.embed(scan_img), box)
    np.testing.assert_array_equal(_decode_png(body["labels_png"]), truth.label_image())
    assert "rle" not in body
    # the displayed slice is what the model embeds
    png = client.request("GET", f"/v1/images/{info['id']}/slices/0.png")
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(png.data))), scan_img)


def test_nifti_volume_slices_embedding_and_label_volume(client, lite_model):
    nibabel = pytest.importorskip("nibabel")
    path = _nifti()
    r = client.upload(path.read_bytes(), "anatomical.nii", slice=12)
    assert r.status == 200, r.data
    info = r.json()
    scan = read_scan(path)
    assert (info["slices"], info["height"], info["width"], info["slice"]) == (scan.num_slices, *scan.image_size, 12)
    box = [[19, 10, 31, 21]]
    body = client.request("POST", f"/v1/images/{info['id']}/segment", json_body={"boxes": box, "slice": 12}).json()
    truth, image = _truth(lite_model, path, box, k=12)
    np.testing.assert_array_equal(_decode_png(body["labels_png"]), truth.label_image())

    # the embedding for a client-side decoder: the library's, with the recipe's sizes
    emb = client.request("GET", f"/v1/images/{info['id']}/embedding?slice=12")
    meta = json.loads(emb.headers["x-medsam-embedding"])
    lib = lite_model.embed(image)
    assert meta["shape"] == list(lib.embeddings.shape) and meta["dtype"] == "float32"
    assert meta["original_size"] == list(lib.original_size) and meta["resized_size"] == list(lib.resized_size)
    assert (meta["postprocess"], meta["pad_size"], meta["box_round"]) == ("crop_resize", [256, 256], "floor")
    np.testing.assert_array_equal(np.frombuffer(emb.data, "<f4").reshape(meta["shape"]), lib.embeddings)
    half = client.request("GET", f"/v1/images/{info['id']}/embedding?slice=12&dtype=float16")
    np.testing.assert_array_equal(np.frombuffer(half.data, "<f2"), lib.embeddings.astype(np.float16).ravel())

    # a NIfTI label volume in the source's geometry, labels on the segmented slices
    r = client.request(
        "POST", f"/v1/images/{info['id']}/labels", json_body={"boxes": {"12": box, "13": box}, "format": "nii.gz"}
    )
    assert r.status == 200, r.data
    assert "anatomical-labels.nii.gz" in r.headers["content-disposition"]
    vol = nibabel.Nifti1Image.from_bytes(gzip.decompress(r.data))
    src = nibabel.load(path)
    assert vol.shape == src.shape and np.allclose(vol.affine, src.affine)
    data = np.asarray(vol.dataobj)
    np.testing.assert_array_equal(data[:, :, 12].T, truth.label_image())
    truth13, _ = _truth(lite_model, path, box, k=13)
    np.testing.assert_array_equal(data[:, :, 13].T, truth13.label_image())
    assert not data[:, :, 11].any()


def test_identical_uploads_share_the_embedding(client, lite_server):
    before = client.request("GET", "/metrics").data.decode()
    data = _ct().read_bytes()
    ids = [client.upload(data, "again.dcm").json() for _ in range(2)]
    after = client.request("GET", "/metrics").data.decode()
    assert ids[0]["id"] != ids[1]["id"]
    assert all(i["ms"]["embed"] < 50 for i in ids)  # CT_small was embedded by the module's first upload
    misses = "medsam_embedding_cache_misses_total"
    assert _metric(after, misses) == _metric(before, misses)
    assert (
        _metric(after, "medsam_embedding_cache_hits_total") >= _metric(before, "medsam_embedding_cache_hits_total") + 2
    )


def test_labels_png_delete_and_model(client, ct_id, lite_model, lite_dir_fp32):
    box = [[45, 40, 75, 65]]
    r = client.request("POST", f"/v1/images/{ct_id}/labels", json_body={"boxes": {"0": box}})
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    truth, _ = _truth(lite_model, _ct(), box)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(r.data))), truth.label_image())

    m = client.request("GET", "/v1/model").json()
    assert m["model_id"] == lite_model.model_id and m["precision"] == "fp32" and m["device"] == "cpu"
    assert m["preprocessing"]["postprocess"] == "crop_resize" and m["auth"] is False
    dec = client.request("GET", m["browser_decoder"]["url"])
    manifest = json.loads((Path(lite_dir_fp32) / "manifest.json").read_text())
    assert hashlib.sha256(dec.data).hexdigest() == manifest["graphs"]["decoder"]["fp32"]["sha256"]

    new = client.upload(_ct().read_bytes(), "gone.dcm").json()["id"]
    assert client.request("DELETE", f"/v1/images/{new}").json() == {"id": new, "deleted": True}
    gone = client.request("POST", f"/v1/images/{new}/segment", json_body={"boxes": box})
    assert gone.status == 404 and gone.json()["error"]["field"] == "id"


def test_health_metrics_openapi_and_page(client, lite_server):
    assert client.request("GET", "/healthz").json()["status"] == "ok"
    text = client.request("GET", "/metrics").data.decode()
    assert 'medsam_requests_total{method="POST",route="/v1/images",status="200"}' in text
    assert 'medsam_request_seconds_bucket{method="POST",route="/v1/images/{image_id}/segment",le="+Inf"}' in text
    assert 'medsam_stage_seconds_count{stage="embed"}' in text and "medsam_embedding_cache_hits_total" in text
    spec = client.request("GET", "/openapi.json").json()
    for path in (
        "/v1/images",
        "/v1/images/{image_id}/segment",
        "/v1/images/{image_id}/embedding",
        "/v1/model",
        "/v1/images/{image_id}/labels",
        "/healthz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert "SegmentRequest" in spec["components"]["schemas"]
    page = client.request("GET", "/")
    assert page.status == 200 and b"medsam-rt" in page.data
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    js = client.request("GET", "/static/upscale.js")
    assert js.status == 200 and b"export function upscaleMask" in js.data


# -- errors: every bad input is a 4xx JSON error naming the field -------------------------------------------------


def _bad(r, status: int, field: str | None):
    assert r.status == status, (r.status, r.data)
    err = r.json()["error"]
    assert err["status"] == status and err["field"] == field, err
    assert "Traceback" not in r.data.decode() and "/tmp" not in err["message"]
    return err["message"]


def test_error_paths(client, ct_id):
    seg = f"/v1/images/{ct_id}/segment"
    assert "outside" in _bad(client.request("POST", seg, json_body={"boxes": [[30, 30, 900, 90]]}), 400, "boxes")
    _bad(client.request("POST", seg, json_body={"boxes": [[50, 50, 40, 60]]}), 400, "boxes")  # inverted
    _bad(
        client.request("POST", seg, body=b'{"boxes": [[NaN, 1, 5, 5]]}', headers={"Content-Type": "application/json"}),
        400,
        "boxes",
    )
    _bad(client.request("POST", seg, json_body={"boxes": [[1, 2, 3]]}), 422, "boxes")
    _bad(client.request("POST", seg, json_body={"boxes": []}), 422, "boxes")
    _bad(client.request("POST", seg, json_body={"boxes": [["a", 1, 2, 3]]}), 422, "boxes")
    _bad(client.request("POST", seg, json_body={"boxes": [[1, 1, 5, 5]], "slice": 3}), 400, "slice")
    _bad(client.request("POST", seg, json_body={"boxes": [[1, 1, 5, 5]], "colour": 1}), 422, "colour")
    _bad(client.request("POST", seg, body=b"{not json", headers={"Content-Type": "application/json"}), 422, "body")
    _bad(client.request("POST", seg, json_body={"boxes": [[1, 1, 5, 5]] * 1025}), 400, "boxes")  # --max-boxes
    _bad(client.request("POST", "/v1/images/nope/segment", json_body={"boxes": [[1, 1, 5, 5]]}), 404, "id")
    _bad(client.request("GET", "/v1/images/nope/embedding"), 404, "id")
    _bad(client.request("GET", f"/v1/images/{ct_id}/embedding?dtype=int8"), 422, "dtype")
    _bad(client.request("GET", f"/v1/images/{ct_id}/embedding?slice=-1"), 400, "slice")
    _bad(client.request("GET", f"/v1/images/{ct_id}/slices/7.png"), 400, "slice")
    _bad(client.request("DELETE", "/v1/images/nope"), 404, "id")
    _bad(client.request("GET", "/v1/nothing"), 404, "path")
    _bad(client.request("PUT", "/v1/model"), 405, "path")
    lab = f"/v1/images/{ct_id}/labels"
    _bad(client.request("POST", lab, json_body={"boxes": {"x": [[1, 1, 5, 5]]}}), 422, "boxes")
    _bad(client.request("POST", lab, json_body={"boxes": {"0": [[1, 1, 5, 5]]}, "format": "bmp"}), 422, "format")

    # uploads
    _bad(client.request("POST", "/v1/images", body=b""), 422, "file")
    body, ctype = multipart({"window": "auto"}, None)
    _bad(client.request("POST", "/v1/images", body=body, headers={"Content-Type": ctype}), 422, "file")
    _bad(client.upload(b"", "empty.png"), 400, "file")
    msg = _bad(client.upload(b"hello, not an image", "notes.txt"), 400, "file")
    assert "notes.txt" in msg
    _bad(client.upload(b"\x89PNG\r\n\x1a\n" + os.urandom(200), "broken.png"), 400, "file")
    _bad(client.upload(_ct().read_bytes()[:3000], "cut.dcm"), 400, "file")
    _bad(client.upload(_ct().read_bytes(), "ct.dcm", window="purple"), 400, "window")
    _bad(client.upload(_ct().read_bytes(), "ct.dcm", slice=5), 400, "slice")
    _bad(client.upload(_ct().read_bytes(), "ct.dcm", slice="x"), 422, "slice")
    rgb = _png_bytes(np.zeros((20, 20, 3), np.uint8))
    _bad(client.upload(rgb, "rgb.png", window="soft-tissue"), 400, "window")  # a CT window on a colour image


# -- a second server: token, size limit, queue limit, expiry, many boxes ------------------------------------------


@pytest.fixture(scope="module")
def strict_server(tiny_dir, tmp_path_factory):
    args = "--token s3cret --max-upload-mb 0.1 --idle-timeout 1.5 --max-queue 1 --max-images 3 --threads 1".split()
    with ServerProcess(tiny_dir, *args, log_dir=tmp_path_factory.mktemp("serve")) as srv:
        yield srv


def test_token_required(strict_server):
    anon = Client(strict_server.url)
    _bad(anon.request("GET", "/v1/model"), 401, "Authorization")
    _bad(anon.request("GET", "/metrics"), 401, "Authorization")
    _bad(anon.request("GET", "/v1/model", headers={"Authorization": "Bearer wrong"}), 401, "Authorization")
    _bad(anon.request("GET", "/v1/model", headers={"Authorization": "s3cret"}), 401, "Authorization")
    assert anon.request("GET", "/healthz").status == 200 and anon.request("GET", "/").status == 200
    ok = Client(strict_server.url, token="s3cret")
    assert ok.request("GET", "/v1/model").json()["auth"] is True
    assert "medsam_rejected_auth_total 4" in ok.request("GET", "/metrics").data.decode()


def test_size_limit(strict_server):
    c = Client(strict_server.url, token="s3cret")
    big = _png_bytes(np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8))
    assert len(big) > 0.1 * (1 << 20)
    _bad(c.upload(big, "big.png"), 413, "body")
    # a chunked body (no Content-Length) is cut off once it passes the limit
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(strict_server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body, ctype = multipart({}, ("file", "big.png", big))
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    conn.request(
        "POST",
        "/v1/images",
        body=chunks,
        encode_chunked=True,
        headers={"Content-Type": ctype, "Authorization": "Bearer s3cret"},
    )
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["field"] == "body"


def test_many_boxes_sixteen_bit_labels(strict_server, tiny_dir):
    c = Client(strict_server.url, token="s3cret")
    img = np.random.default_rng(1).integers(0, 255, (64, 96), dtype=np.uint8)
    iid = c.upload(_png_bytes(img), "small.png").json()["id"]
    boxes = [[x, y, x + 6, y + 6] for y in range(0, 56, 3) for x in range(0, 88, 6)][:260]
    r = c.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": boxes})
    assert r.status == 200, r.data
    labels = _decode_png(r.json()["labels_png"])
    truth = MedSAM.load(tiny_dir, threads=1).predict(img, boxes)
    assert labels.dtype == np.uint16 and truth.label_image().dtype == np.uint16
    np.testing.assert_array_equal(labels, truth.label_image())


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_jpeg_and_tiff_uploads(strict_server, tiny_dir, fmt):
    rng = np.random.default_rng(5)
    img = (
        rng.integers(0, 255, (48, 70, 3), dtype=np.uint8)
        if fmt == "JPEG"
        else (rng.integers(0, 60000, (48, 70)).astype(np.uint16))
    )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    c = Client(strict_server.url, token="s3cret")
    info = c.upload(buf.getvalue(), f"upload.{fmt.lower()}").json()
    assert (info["width"], info["height"]) == (70, 48)
    box = [[5, 5, 50, 40]]
    body = c.request("POST", f"/v1/images/{info['id']}/segment", json_body={"boxes": box}).json()
    scan = read_scan_bytes(buf.getvalue(), f"x.{fmt.lower()}")
    image = to_display(scan.values[0], display_range(scan, "auto"))
    truth = MedSAM.load(tiny_dir, threads=1).predict(image, box)
    np.testing.assert_array_equal(_decode_png(body["labels_png"]), truth.label_image())


def read_scan_bytes(data: bytes, name: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        return read_scan(path)


def test_queue_full_is_503(strict_server):
    img = _png_bytes(np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8))
    iid = Client(strict_server.url, token="s3cret").upload(img, "q.png").json()["id"]
    boxes = [[x, x, x + 20, x + 20] for x in range(0, 40, 2)] * 12  # slow enough to overlap
    results: list[int] = []

    def go() -> None:
        c = Client(strict_server.url, token="s3cret")
        results.append(c.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": boxes}).status)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 200 in results and 503 in results and set(results) <= {200, 503}, results
    text = Client(strict_server.url, token="s3cret").request("GET", "/metrics").data.decode()
    assert _metric(text, "medsam_rejected_busy_total") == results.count(503)


def test_idle_expiry_and_max_images(strict_server):
    c = Client(strict_server.url, token="s3cret")
    img = _png_bytes(np.random.default_rng(4).integers(0, 255, (32, 32), dtype=np.uint8))
    ids = [c.upload(img, f"e{i}.png").json()["id"] for i in range(4)]
    _bad(c.request("GET", f"/v1/images/{ids[0]}"), 404, "id")  # --max-images 3: the oldest went
    assert c.request("GET", f"/v1/images/{ids[3]}").status == 200
    time.sleep(2.4)  # --idle-timeout 1.5 (swept every 0.375 s)
    assert c.request("GET", "/healthz").json()["images"] == 0
    _bad(c.request("GET", f"/v1/images/{ids[3]}"), 404, "id")
    assert _metric(c.request("GET", "/metrics").data.decode(), "medsam_images_expired_total") >= 3


# -- a bounded load ----------------------------------------------------------------------------------------------


def test_bounded_load(lite_server, ct_id):
    """4 clients x 10 segment requests on one image: every answer 200, equal masks for equal boxes, RSS flat."""
    rss0 = lite_server.rss_bytes()
    boxes = [[45, 40, 75, 65], [37, 5, 83, 48], [20, 20, 100, 100]]
    out: dict[int, list] = {}
    errors: list = []

    def client_loop(n: int) -> None:
        c = Client(lite_server.url)
        for i in range(10):
            r = c.request("POST", f"/v1/images/{ct_id}/segment", json_body={"boxes": [boxes[(n + i) % 3]]})
            if r.status != 200:
                errors.append(r.status)
            else:
                out.setdefault((n + i) % 3, []).append(r.json()["labels_png"])

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(len(v) for v in out.values()) == 40
    assert all(len(set(v)) == 1 for v in out.values())  # the same box gives the same labels every time
    assert lite_server.rss_bytes() - rss0 < 50 << 20
