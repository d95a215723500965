"""Reliability and safety: one model shared by threads, the embedding cache, flat memory over thousands of calls,
model directories verified on load, checkpoints that are never unpickled, exports and outputs that are atomic
even when killed, and node placement. Long soak runs are marked ``soak`` (see docs/reliability.md)."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_command, rng_image

from medsam_rt import EmbeddingMismatchError, MedSAM, ModelDirError, ProviderUnavailableError
from medsam_rt.core import manifest as manifest_mod
from medsam_rt.core.cache import CacheStats, EmbeddingCache, default_max_bytes, image_digest
from medsam_rt.core.manifest import MANIFEST_NAME, sha256_file
from medsam_rt.core.providers import NodePlacement, PlacedNode, node_placement


@pytest.fixture(scope="session")
def soak(request):
    """Skip long runs unless ``-m soak`` selects them (until pyproject.toml registers and deselects the marker)."""
    registered = any(m.split(":")[0].strip() == "soak" for m in request.config.getini("markers"))
    if not registered and "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long soak tier: run with -m soak")


@pytest.fixture(autouse=True)
def private_verify_records(tmp_path, monkeypatch):
    """Keep the load-verification fast path's records out of the user's cache directory."""
    monkeypatch.setenv(manifest_mod.VERIFY_CACHE_ENV, str(tmp_path.parent / f"{tmp_path.name}-verified.json"))


# -- one model, many threads ----------------------------------------------------------------------------------------


def _run_threads(n: int, work) -> list:
    """Run ``work(k)`` in ``n`` threads released together; re-raise the first failure."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def body(k):
        try:
            barrier.wait()
            results[k] = work(k)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_one_model_shared_by_8_threads_matches_serial(lite_dir):
    """8 threads mix embed and segment on different images through one MedSAM: every result bit-identical."""
    from medsam_rt.tools.samples import validation_set

    samples = validation_set()
    model = MedSAM.load(lite_dir, precision="fp32", cache=False)
    serial_emb = [model.embed(s.image) for s in samples]
    serial_seg = [model.segment(e, s.boxes) for e, s in zip(serial_emb, samples, strict=True)]

    def work(k):
        rng = random.Random(k)
        tasks = [("embed", i) for i in rng.sample(range(len(samples)), 2)]
        tasks += [("segment", rng.randrange(len(samples))) for _ in range(6)]
        rng.shuffle(tasks)
        for kind, i in tasks:
            if kind == "embed":
                emb = model.embed(samples[i].image)
                assert np.array_equal(emb.embeddings, serial_emb[i].embeddings), (k, i)
                assert (emb.original_size, emb.resized_size) == (
                    serial_emb[i].original_size,
                    serial_emb[i].resized_size,
                )
                res = model.segment(emb, samples[i].boxes)  # and decode on the embedding this thread made
            else:
                res = model.segment(serial_emb[i], samples[i].boxes)
            ref = serial_seg[i]
            assert np.array_equal(res.masks, ref.masks) and np.array_equal(res.probs, ref.probs), (k, kind, i)
            assert np.array_equal(res.scores, ref.scores) and np.array_equal(res.low_res_logits, ref.low_res_logits)
        return len(tasks) + sum(kind == "embed" for kind, _ in tasks)

    calls = _run_threads(8, work)
    assert sum(calls) == 8 * 10  # 16 embeds + 64 segments, every one checked


def test_threads_share_the_cache_and_encode_each_image_once(lite_dir):
    from medsam_rt.tools.samples import validation_set

    samples = validation_set()[:4]
    cache = EmbeddingCache()
    model = MedSAM.load(lite_dir, precision="fp32", cache=cache)
    reference = MedSAM.load(lite_dir, precision="fp32", cache=False)
    embs = _run_threads(8, lambda k: [model.embed(s.image) for s in samples])
    stats = cache.stats()
    assert stats.misses == len(samples) and stats.hits == 8 * len(samples) - len(samples)  # one encoder run each
    for i, s in enumerate(samples):
        assert all(e[i] is embs[0][i] for e in embs)
        np.testing.assert_array_equal(embs[0][i].embeddings, reference.embed(s.image).embeddings)


# -- the embedding cache ----------------------------------------------------------------------------------------------


class _Value:
    def __init__(self, n: int) -> None:
        self.embeddings = np.zeros(n, np.uint8)


def test_cache_is_lru_bounded_by_bytes():
    cache = EmbeddingCache(max_bytes=300)
    for key in "abc":
        cache.put(key, _Value(100))
    assert cache.get("a") is not None  # a is now the most recent: b is the oldest
    cache.put("d", _Value(100))
    assert "b" not in cache and {"a", "c", "d"} == {k for k in "abcd" if k in cache}
    cache.put("big", _Value(301))  # larger than the budget: handed back, never kept
    assert "big" not in cache
    cache.put("e", _Value(250))
    assert cache.stats() == CacheStats(hits=1, misses=0, evictions=4, entries=1, bytes=250, max_bytes=300)
    assert cache.get("zzz") is None and cache.stats().misses == 1 and cache.stats().hit_rate == 0.5
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(max_bytes=-1)


def test_cache_computes_each_key_once_under_contention_and_never_caches_failures():
    cache = EmbeddingCache(max_bytes=10_000)
    runs = []

    def slow():
        runs.append(1)
        time.sleep(0.2)
        return _Value(10)

    values = _run_threads(8, lambda k: cache.get_or_compute("k", slow))
    assert len(runs) == 1 and all(v is values[0] for v in values)
    assert (cache.stats().misses, cache.stats().hits) == (1, 7)

    def boom():
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("bad", boom)
    assert "bad" not in cache and cache.get_or_compute("bad", lambda: _Value(1)).embeddings.size == 1


def test_model_cache_keys_and_precision_mismatch(tiny_dir):
    shared = EmbeddingCache(max_bytes=64 * 2**20)
    fp32 = MedSAM.load(tiny_dir, precision="fp32", cache=shared)
    fp16 = MedSAM.load(tiny_dir, precision="fp16", cache=shared)
    image = rng_image((90, 120, 3), seed=3)
    a = fp32.embed(image)
    assert fp32.embed(image.copy()) is a  # same pixels: a hit, the same read-only object
    assert not a.embeddings.flags.writeable
    assert fp32.embed(np.asfortranarray(image)) is a  # memory layout is not content
    assert fp32.embed(image.astype(np.uint16)) is not a  # another dtype is another image (other scaling)
    b = fp16.embed(image)
    assert b is not a and b.model_id.endswith("#fp16")  # same pixels, other precision: other key
    assert shared.stats().entries == 3 and shared.stats().bytes == 3 * a.embeddings.nbytes
    with pytest.raises(EmbeddingMismatchError, match="#fp32.*not by this model.*#fp16"):
        fp16.segment(a, [0, 0, 50, 50])
    with pytest.raises(EmbeddingMismatchError, match="#fp16.*not by this model.*#fp32"):
        fp32.segment(b, [0, 0, 50, 50])
    assert MedSAM.load(tiny_dir).cache is None  # off by default: every embed encodes (benchmarks time it)
    assert MedSAM.load(tiny_dir, cache=True).cache.max_bytes == default_max_bytes() <= 256 * 2**20
    assert MedSAM.load(tiny_dir, cache=1234).cache.max_bytes == 1234
    assert image_digest(image) != image_digest(image[:, :, ::-1])


def test_altered_embeddings_are_refused(tiny_dir):
    from dataclasses import replace

    model = MedSAM.load(tiny_dir, cache=False)
    emb = model.embed(rng_image((80, 100), seed=1))
    for bad, what in (
        (replace(emb, embeddings=emb.embeddings[:, :16]), "float32"),
        (replace(emb, embeddings=emb.embeddings.astype(np.float64)), "float64"),
        (replace(emb, embeddings=[1, 2]), "list"),
        (replace(emb, original_size=(0, 100)), "inconsistent"),
        (replace(emb, resized_size=(100, 80)), "inconsistent"),
        (replace(emb, original_size=None), "inconsistent"),
    ):
        with pytest.raises(EmbeddingMismatchError, match=what):
            model.segment(bad, [0, 0, 10, 10])


# -- flat memory over thousands of calls -----------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SOAK_SIZES = [(64, 64), (97, 203), (256, 256), (300, 700), (512, 512), (33, 1000), (1000, 40), (128, 128)]


def run_soak(model_dir: Path, segments: int, embeds: int, seed: int = 0) -> dict:
    """``segments`` segment calls (1-8 random boxes) and ``embeds`` embed calls on distinct images of 8 shapes,
    through a model with a 4 MiB embedding cache, after a warm-up on every shape and box count (ONNX Runtime's
    arena and the postprocessing matrices reach their size). The first third of the calls lets the C allocator
    settle (glibc raises its mmap threshold after large frees, so large arrays move onto the heap once); the
    growth is measured over the remaining two thirds, where a leak would keep growing."""
    model = MedSAM.load(model_dir, precision="fp32", cache=4 * 2**20)
    rng = np.random.default_rng(seed)
    bases = [rng_image((*size, 3), seed=k) for k, size in enumerate(SOAK_SIZES)]

    def boxes(shape, n):
        h, w = shape[:2]
        x0, y0 = rng.uniform(0, w * 0.8, n), rng.uniform(0, h * 0.8, n)
        return np.stack([x0, y0, rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h)], axis=1)

    pool = [model.embed(b) for b in bases]
    for emb, base in zip(pool, bases, strict=True):  # warm-up: every shape, every box count
        for n in range(1, 9):
            model.segment(emb, boxes(base.shape, n))
    gc.collect()
    warm = _rss_mib()
    settle, samples = segments // 3, []
    t0 = time.perf_counter()
    every = max(1, segments // max(1, embeds))
    done_embeds = 0
    for i in range(segments):
        if i == settle:
            gc.collect()
            start = _rss_mib()
        if done_embeds < embeds and i % every == 0:
            k = done_embeds % len(bases)
            pool[k] = model.embed(bases[k] ^ np.uint8(1 + done_embeds % 255))  # new content: a cache miss
            done_embeds += 1
        k = int(rng.integers(len(pool)))
        res = model.segment(pool[k], boxes(bases[k].shape, int(rng.integers(1, 9))))
        assert res.masks.shape[1:] == bases[k].shape[:2]
        if i > settle and i % 20 == 0:
            samples.append(_rss_mib())
    gc.collect()
    end = _rss_mib()
    stats = model.cache.stats()
    assert stats.bytes <= stats.max_bytes
    return {
        "segments": segments,
        "embeds": done_embeds,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_warm_mib": round(warm, 1),
        "settle_mib": round(start - warm, 1),
        "rss_start_mib": round(start, 1),
        "rss_end_mib": round(end, 1),
        "growth_mib": round(end - start, 1),
        "max_growth_mib": round(max(samples + [end]) - start, 1),
        "cache": stats,
    }


SOAK_BOUND_MIB = 16


def test_memory_stays_flat_short(tiny_dir):
    figures = run_soak(tiny_dir, segments=240, embeds=24)
    print(f"soak (short): {figures}")
    assert figures["growth_mib"] < SOAK_BOUND_MIB, figures


@pytest.mark.soak
def test_memory_stays_flat_soak(tiny_dir, soak):
    figures = run_soak(tiny_dir, segments=2000, embeds=200, seed=1)
    print(f"soak: {figures}")
    assert figures["growth_mib"] < SOAK_BOUND_MIB, figures


# -- model directories verified on load ------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def _record(d: Path, role: str, precision: str, file: str | None = None) -> None:
    """Make the manifest describe ``file`` (default: the entry's file) as it is now: a consistent manifest."""
    m = _manifest(d)
    entry = m["graphs"][role][precision]
    entry["file"] = file or entry["file"]
    entry["sha256"], entry["bytes"] = sha256_file(d / entry["file"]), (d / entry["file"]).stat().st_size
    (d / MANIFEST_NAME).write_text(json.dumps(m))


def _edit_metadata(path: Path, **changes: str | None) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(manifest_mod.METADATA_PREFIX + key, None)
        if value is not None:
            props[manifest_mod.METADATA_PREFIX + key] = value
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_fast_path_hashes_each_file_version_once(model_copy, monkeypatch, tmp_path):
    hashed = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(manifest_mod, "_verified", {})
    listing = sorted(p.name for p in model_copy.iterdir())
    MedSAM.load(model_copy, precision="fp32")
    assert sorted(hashed) == ["decoder.fp32.onnx", "encoder.fp32.onnx"]
    MedSAM.load(model_copy, precision="fp32")  # same files (size, inode, mtime, ctime): not hashed again
    assert len(hashed) == 2
    MedSAM.load(model_copy, precision="fp32", verify=True)  # verify: always hashed
    assert len(hashed) == 4
    monkeypatch.setattr(manifest_mod, "_verified", {})  # a new process: the records in the cache file hold
    MedSAM.load(model_copy, precision="fp32")
    assert len(hashed) == 4
    assert sorted(p.name for p in model_copy.iterdir()) == listing  # nothing written into the model directory
    for unusable in ("off", str(tmp_path / "a-file" / "verified.json")):  # disabled / cannot be written
        (tmp_path / "a-file").write_text("x")
        monkeypatch.setenv(manifest_mod.VERIFY_CACHE_ENV, unusable)
        monkeypatch.setattr(manifest_mod, "_verified", {})
        MedSAM.load(model_copy, precision="fp32")
    assert len(hashed) == 8


def test_edited_graph_is_caught_even_with_its_mtime_restored(model_copy):
    MedSAM.load(model_copy, precision="fp32")  # recorded as verified
    enc = model_copy / "encoder.fp32.onnx"
    st = enc.stat()
    _flip_byte(enc, st.st_size // 2)
    os.utime(enc, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; the ctime moved
    with pytest.raises(ModelDirError, match=r"encoder\.fp32\.onnx .*has sha256 .*manifest says.*edited or replaced"):
        MedSAM.load(model_copy, precision="fp32")


def test_truncated_swapped_and_foreign_graphs_name_the_file(model_copy):
    enc32, enc16 = model_copy / "encoder.fp32.onnx", model_copy / "encoder.fp16.onnx"
    original = enc32.read_bytes()
    enc32.write_bytes(original[:-10])
    with pytest.raises(ModelDirError, match=r"encoder\.fp32\.onnx has \d+ bytes, the manifest says \d+: truncated"):
        MedSAM.load(model_copy, precision="fp32")

    # swapped files under a manifest made consistent with them: the graphs' own metadata tells
    enc32.write_bytes(enc16.read_bytes())
    enc16.write_bytes(original)
    _record(model_copy, "encoder", "fp32")
    _record(model_copy, "encoder", "fp16")
    with pytest.raises(ModelDirError, match=r"encoder\.fp32\.onnx: its metadata says precision='fp16'"):
        MedSAM.load(model_copy, precision="fp32")
    m = _manifest(model_copy)
    m["graphs"]["encoder"]["fp32"]["file"] = "decoder.fp32.onnx"
    (model_copy / MANIFEST_NAME).write_text(json.dumps(m))
    _record(model_copy, "encoder", "fp32")
    with pytest.raises(ModelDirError, match=r"decoder\.fp32\.onnx"):  # a decoder where the encoder should be
        MedSAM.load(model_copy, precision="fp32")


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("foreign-model", r"decoder\.fp32\.onnx: its metadata 'model' differs from manifest\.json's"),
        ("no-metadata", r"decoder\.fp32\.onnx carries no medsam_rt\.\* metadata"),
        ("other-encoder", r"decoder\.fp32\.onnx pairs with encoder sha256 0000000000000000"),
        ("schema", r"decoder\.fp32\.onnx: its metadata says schema_version='7'"),
        ("edited-manifest", r"encoder\.fp32\.onnx: its metadata 'preprocessing' differs from manifest\.json's"),
        ("not-onnx", r"cannot load .*decoder\.fp32\.onnx: not a valid ONNX graph"),
        ("bad-schema", r"manifest\.json has schema_version 2"),
    ],
)
def test_graph_metadata_must_match_the_manifest(model_copy, case, pattern):
    dec = model_copy / "decoder.fp32.onnx"
    if case == "foreign-model":
        m = _manifest(model_copy)
        _edit_metadata(dec, model=json.dumps({**m["model"], "checksum": "sha256:other"}, sort_keys=True))
    elif case == "no-metadata":
        import onnx

        model = onnx.load(str(dec))
        del model.metadata_props[:]
        onnx.save(model, str(dec))
    elif case == "other-encoder":
        _edit_metadata(dec, encoder_sha256="0" * 64)
    elif case == "schema":
        _edit_metadata(dec, schema_version="7")
    elif case == "not-onnx":
        dec.write_bytes(os.urandom(4096))
    if case in ("edited-manifest", "bad-schema"):
        m = _manifest(model_copy)
        if case == "bad-schema":
            m["schema_version"] = 2
        else:
            m["preprocessing"]["interpolation"] = "bicubic"
        (model_copy / MANIFEST_NAME).write_text(json.dumps(m))
    else:
        _record(model_copy, "decoder", "fp32")
    with pytest.raises(ModelDirError, match=pattern):
        MedSAM.load(model_copy, precision="fp32")


# -- checkpoints are never unpickled ---------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs code: it writes the file named by ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_checkpoint_is_refused_unexecuted(tmp_path, container):
    import pickle

    import torch

    from medsam_rt.errors import ExportError
    from medsam_rt_export.sources import load_source

    marker = tmp_path / "pwned"
    evil = tmp_path / "medsam_vit_b.pth"
    payload = {"image_encoder.patch_embed.proj.weight": torch.zeros(2), "x": _Exploit(str(marker))}
    if container == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    pickle.loads(pickle.dumps(_Exploit(str(tmp_path / "control"))))  # the payload does run when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(ExportError, match="refusing to unpickle arbitrary objects"):
        load_source(str(evil))
    assert not marker.exists()
    r = subprocess.run(
        cli_command("export", "--quiet", "--model", str(evil), "--out", str(tmp_path / "o")),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "medsam_vit_b.pth" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


# -- atomic export and outputs ---------------------------------------------------------------------------------------


def _start_export(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(
            "export", "--random-weights", "--arch", "tiny", "--out", str(out), "--precision", "fp32,fp16", *extra
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _wait_for(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a file ``name`` exists in a ``.<out>.partial-*`` directory under ``parent``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(parent.glob(f".*.partial-*/{name}")):
            return
        if proc.poll() is not None:
            pytest.fail(f"export ended (rc {proc.returncode}) before writing {name}: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"export did not write {name} within {timeout} s")


def _looks_valid(d: Path) -> bool:
    try:
        MedSAM.load(d, precision="fp32")
        return True
    except ModelDirError:
        return False


@pytest.mark.parametrize("stage", ["raw.encoder.onnx", "encoder.fp16.onnx"])
def test_killed_export_leaves_no_valid_looking_directory(tmp_path, stage):
    out = tmp_path / "model"
    proc = _start_export(out)
    _wait_for(tmp_path, stage, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".model.partial-") for p in leftovers), leftovers  # hidden, clearly partial
    for p in leftovers:
        assert not (p / MANIFEST_NAME).exists() and not _looks_valid(p)


def test_interrupted_export_cleans_up_and_keeps_the_old_model(tmp_path, tiny_dir):
    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _start_export(out, "--force")
    _wait_for(tmp_path, "raw.decoder.onnx", proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the exporter removes its partial directory
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _looks_valid(out)
    proc = _start_export(out, "--force")  # SIGKILL: no clean-up runs, and the old model is still intact
    _wait_for(tmp_path, "encoder.fp32.onnx", proc)
    proc.kill()
    proc.wait(30)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _looks_valid(out)


def test_failed_output_write_leaves_the_old_file(tmp_path, monkeypatch):
    from PIL import Image

    from medsam_rt.core.images import save_png

    target = tmp_path / "labels.png"
    save_png(target, np.full((4, 4), 7, np.uint8))
    before = target.read_bytes()

    def half_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(target, np.zeros((4, 4), np.uint8))
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["labels.png"]


# -- providers and node placement ------------------------------------------------------------------------------------


def test_unavailable_device_is_an_error(tiny_dir):
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*available: .*CPUExecutionProvider"):
        MedSAM.load(tiny_dir, device="cuda")


def test_node_placement_report_and_check(tiny_dir):
    model = MedSAM.load(tiny_dir, precision="fp32")
    placements = model.node_placement()
    for role, placement in placements.items():
        assert placement.graph == f"{role}.fp32.onnx" and placement.device == "cpu"
        assert placement.counts() == {"CPUExecutionProvider": len(placement.nodes)} and len(placement.nodes) > 20
        assert not placement.fallbacks()
        placement.check()
        assert f"{role}.fp32.onnx on cpu: {len(placement.nodes)} nodes (CPUExecutionProvider" in placement.summary()
    boxes = np.float32([[1, 2, 300, 400], [5, 5, 50, 60]])
    emb = model.embed(rng_image((64, 64))).embeddings
    dec = node_placement(tiny_dir / "decoder.fp32.onnx", "cpu", {"image_embeddings": emb, "boxes": boxes})
    assert {n.name for n in dec.nodes} == {n.name for n in placements["decoder"].nodes}

    # the check itself, on a CUDA placement as ONNX Runtime reports one: shape ops on the CPU are expected
    cuda = NodePlacement(
        "encoder.fp16.onnx",
        "cuda",
        (
            PlacedNode("attn_matmul", "MatMul", "CUDAExecutionProvider", 1 << 20),
            PlacedNode("shape_of_x", "Shape", "CPUExecutionProvider", 32),
            PlacedNode("concat_dims", "Concat", "CPUExecutionProvider", 32),
            PlacedNode("copy_in", "MemcpyToHost", "CUDAExecutionProvider", 64),
        ),
    )
    cuda.check()
    assert cuda.counts() == {"CUDAExecutionProvider": 2, "CPUExecutionProvider": 2}
    fell_back = NodePlacement(
        "encoder.fp16.onnx",
        "cuda",
        cuda.nodes
        + (
            PlacedNode("/blocks.0/norm1/LayerNorm", "LayerNormalization", "CPUExecutionProvider", 1 << 20),
            PlacedNode("big_gather", "Gather", "CPUExecutionProvider", 1 << 16),
        ),
    )
    assert [n.name for n in fell_back.fallbacks()] == ["/blocks.0/norm1/LayerNorm", "big_gather"]
    with pytest.raises(ProviderUnavailableError, match=r"norm1/LayerNorm \(LayerNormalization, CPUExecutionProvider\)"):
        fell_back.check()
