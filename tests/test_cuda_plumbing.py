"""Both runners through the public API on the CPU provider: the host runner (numpy feeds, the CPU default) and
the IO-bound runner (CUDA's default: device-resident embeddings, buckets with static buffers, what CUDA graphs
replay, masks by the postprocessing graph), which runs the same code on CPU ``OrtValue``s when given a CUDA
option set. Also the option sets, the execution-target table and the bucket plan both runners share.

No GPU here: what only a GPU shows (speed, capture, TF32) is left to benchmarks/gpu_suite.sh. The one fake left
is an ``OrtValue`` of an older ONNX Runtime (no real one can stand in for it in this install).
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from conftest import postprocess_recipe, rng_image

from medsam_rt import MedSAM, OptionSetError
from medsam_rt.core import ortvalues, providers, runners
from medsam_rt.core.cuda import DEFAULT_BUCKETS, OPTION_SETS, OPTIONS_ENV, CudaOptions
from medsam_rt.core.embedding import has_host_copy, stored_value
from medsam_rt.core.ortvalues import copy_into
from medsam_rt.core.postprocess import upscale_logits
from medsam_rt.core.runners import bucket_plan, pad_rows, session_options
from medsam_rt.core.targets import TARGETS, resolve_options
from medsam_rt.errors import EmbeddingMismatchError, ModelDirError

IMAGE = rng_image((300, 700, 3), seed=3)
BOXES = np.array(
    [[10, 20, 200, 250], [300, 40, 650, 290], [0, 0, 700, 300], [50, 50, 60, 60], [100, 10, 400, 200]], float
)


# ---------------------------------------------------------------------------------------------- option sets


def test_named_sets_are_valid_and_change_one_thing_each():
    default = OPTION_SETS["default"]
    assert default.provider_options() == {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kNextPowerOfTwo",
    }
    assert default.io_binding and default.device_postprocess and not default.buckets and not default.cuda_graph
    for name, o in OPTION_SETS.items():
        assert o.name == name and o.description
        changed = {k for k, v in o.to_dict().items() if v != default.to_dict()[k] and k != "name"}
        assert 1 <= len(changed) <= 2 or name == "default", (name, changed)  # cuda-graph: graph + buckets
    assert OPTION_SETS["heuristic-conv"].provider_options()["cudnn_conv_algo_search"] == "HEURISTIC"
    assert OPTION_SETS["arena-same-as-requested"].provider_options()["arena_extend_strategy"] == "kSameAsRequested"
    assert OPTION_SETS["nhwc"].provider_options()["prefer_nhwc"] == "1"
    graph = OPTION_SETS["cuda-graph"]
    assert graph.buckets == DEFAULT_BUCKETS and "enable_cuda_graph" not in graph.provider_options()
    assert graph.provider_options(cuda_graph=True)["enable_cuda_graph"] == "1"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conv_algo_search": "FAST"}, "conv_algo_search 'FAST'"),
        ({"arena_extend_strategy": "grow"}, "arena_extend_strategy"),
        ({"cuda_graph": True}, "cuda_graph needs buckets"),
        ({"buckets": (0, 4)}, "positive integers"),
        ({"buckets": ("x",)}, "positive integers"),
        ({"io_binding": False}, "need io_binding"),  # device_postprocess defaults to True
        ({"io_binding": False, "device_postprocess": False, "buckets": (1,)}, "need io_binding"),
    ],
)
def test_inconsistent_sets_are_refused(kwargs, message):
    with pytest.raises(OptionSetError, match=message):
        CudaOptions("x", **kwargs)


def test_buckets_are_sorted_and_unique():
    assert CudaOptions(buckets=[8, 1, 4, 4]).buckets == (1, 4, 8)


def test_resolve_options(monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    assert resolve_options(None, "cpu") is None  # the CPU keeps the numpy path
    assert resolve_options(None, "cuda") is OPTION_SETS["default"]
    monkeypatch.setenv(OPTIONS_ENV, "cuda-graph")
    assert resolve_options(None, "cuda") is OPTION_SETS["cuda-graph"]
    assert resolve_options(None, "cpu") is None  # the variable names the CUDA set only
    assert resolve_options("nhwc", "cuda") is OPTION_SETS["nhwc"]  # an argument wins over the variable
    custom = CudaOptions("mine", buckets=(2,))
    assert resolve_options(custom, "cpu") is custom
    monkeypatch.setenv(OPTIONS_ENV, "fastest")
    with pytest.raises(OptionSetError, match=rf"'fastest' \(\${OPTIONS_ENV}\); known: default, heuristic-conv"):
        resolve_options(None, "cuda")
    with pytest.raises(OptionSetError, match="must be a name or a CudaOptions, got dict"):
        resolve_options({"buckets": 1}, "cpu")


def test_the_target_table():
    cpu, cuda = TARGETS["cpu"], TARGETS["cuda"]
    assert (cpu.provider, cpu.ortvalue_device, cpu.precisions) == ("CPUExecutionProvider", "cpu", ("int8", "fp32"))
    assert (cuda.provider, cuda.ortvalue_device, cuda.precisions) == ("CUDAExecutionProvider", "cuda", ("fp16", "fp32"))
    assert cuda.options_class is CudaOptions and cpu.options_class is None
    assert providers.DEVICES == ("cpu", "cuda", "auto")
    assert cpu.providers() == ["CPUExecutionProvider"]
    assert cpu.provider_options(OPTION_SETS["nhwc"]) is None  # a CUDA set on the CPU: no provider options


def test_cuda_sessions_get_the_sets_provider_options():
    """What reaches ONNX Runtime's InferenceSession(providers=...) for device="cuda": the list create_session
    passes, with the options of each session MedSAM and the IO-bound runner create."""
    cuda = TARGETS["cuda"]
    o = CudaOptions("x", conv_algo_search="HEURISTIC", prefer_nhwc=True, buckets=(1,), cuda_graph=True)
    assert cuda.providers(cuda.provider_options(o, capture=True)) == [
        (
            "CUDAExecutionProvider",
            {
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kNextPowerOfTwo",
                "prefer_nhwc": "1",
                "enable_cuda_graph": "1",
            },
        ),
        "CPUExecutionProvider",
    ]
    assert cuda.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_model_sessions_get_provider_options_per_graph():
    """On CUDA the encoder is captured (cuda_graph sets) and the dynamic decoder never is; on the CPU no CUDA
    option reaches the CPU provider."""
    cuda, cpu = TARGETS["cuda"], TARGETS["cpu"]
    seen = session_options(OPTION_SETS["cuda-graph"], cuda)
    assert seen["encoder"]["enable_cuda_graph"] == "1" and "enable_cuda_graph" not in seen["decoder"]
    seen = session_options(OPTION_SETS["heuristic-conv"], cuda)
    assert seen["encoder"] == seen["decoder"] == OPTION_SETS["heuristic-conv"].provider_options()
    assert session_options(OPTION_SETS["cuda-graph"], cpu) == {"encoder": None, "decoder": None}
    assert session_options(None, cuda) == {"encoder": None, "decoder": None}


# -------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    "n, buckets, max_chunk, expected",
    [
        (0, DEFAULT_BUCKETS, None, []),
        (1, DEFAULT_BUCKETS, None, [(0, 1, 1)]),
        (3, DEFAULT_BUCKETS, None, [(0, 3, 4)]),
        (8, (1, 2, 4, 8), None, [(0, 8, 8)]),
        (20, (1, 2, 4, 8), None, [(0, 8, 8), (8, 16, 8), (16, 20, 4)]),
        (7, (1, 2, 4, 8), 3, [(0, 3, 4), (3, 6, 4), (6, 7, 1)]),
        (5, (), None, [(0, 5, 5)]),
        (5, (), 2, [(0, 2, 2), (2, 4, 2), (4, 5, 1)]),
        (3, (16,), None, [(0, 3, 16)]),
    ],
)
def test_bucket_plan(n, buckets, max_chunk, expected):
    assert bucket_plan(n, buckets, max_chunk) == expected


@pytest.mark.parametrize("n", range(1, 140, 7))
def test_bucket_plan_covers_every_box_once(n):
    plan = bucket_plan(n, DEFAULT_BUCKETS, max_chunk=11)
    assert [s for s, _, _ in plan] == [0] + [e for _, e, _ in plan[:-1]] and plan[-1][1] == n
    assert all(rows in DEFAULT_BUCKETS and rows >= stop - start for start, stop, rows in plan)


def test_pad_rows_repeats_the_last_box():
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert pad_rows(a, 2) is a
    np.testing.assert_array_equal(pad_rows(a, 4), np.stack([a[0], a[1], a[1], a[1]]))


def test_free_dims_fix_the_box_count(tiny_dir):
    path = str(tiny_dir / "decoder.fp32.onnx")
    session = providers.create_session(path, "cpu", free_dims={"num_boxes": 8})
    assert session.get_inputs()[1].shape == [8, 4] and session.get_outputs()[0].shape == [8, 1, 256, 256]


# ----------------------------------------------------------------------------------- the postprocessing graph


@pytest.fixture(scope="module")
def post_session():
    from medsam_rt_export.postprocess_graph import build_postprocess_graph

    model = build_postprocess_graph(17)
    assert {p.key: p.value for p in model.metadata_props}["medsam_rt.role"] == "postprocess"
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "mode, pad, resized, original",
    [
        ("upscale_crop_resize", 1024, (439, 1024), (300, 700)),  # the Hugging Face recipe, wide image
        ("upscale_crop_resize", 1024, (1024, 768), (2048, 1536)),  # enlarging
        ("upscale_crop_resize", 1024, (1024, 1024), (97, 97)),
        ("crop_resize", 256, (110, 256), (300, 700)),  # LiteMedSAM
        ("crop_resize", 256, (256, 123), (512, 246)),
        ("resize", 1024, (1024, 1024), (300, 700)),  # MedSAM's original recipe
    ],
)
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_postprocess_graph_equals_numpy(post_session, mode, pad, resized, original, threshold):
    """The graph's masks are the numpy path's for every postprocess mode: same matrices, same product order.
    Float32 products may differ in the last bit between MLAS and numpy's BLAS, so pixels whose logit lies within
    1e-4 of the threshold may differ; none other may."""
    from medsam_rt.core.postprocess import axis_matrix

    p = postprocess_recipe(mode, pad, threshold)
    logits = np.random.default_rng(5).standard_normal((6, 1, 256, 256)).astype(np.float32) * 4
    rows = axis_matrix(mode, 256, pad, resized[0], original[0])
    cols = axis_matrix(mode, 256, pad, resized[1], original[1])
    (masks,) = post_session.run(
        None,
        {
            "low_res_logits": logits,
            "num_masks": np.array([4], np.int64),  # the last two rows are padding: dropped
            "rows": rows,
            "cols_t": np.ascontiguousarray(cols.T),
            "mask_threshold": np.array(threshold, np.float32),
        },
    )
    reference = upscale_logits(logits[:4, 0], p, resized, original)
    assert masks.shape == (4, 1, *original) and masks.dtype == bool
    differ = masks[:, 0] != (reference > threshold)
    assert not (differ & (np.abs(reference - threshold) > 1e-4)).any()
    assert differ.mean() < 1e-5


# -------------------------------------------------------------------------- the IO-binding path, end to end


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The numpy path (the CPU default): embedding and segmentation of IMAGE/BOXES."""
    model = MedSAM.load(tiny_dir, precision="fp32")
    emb = model.embed(IMAGE)
    return emb, model.segment(emb, BOXES)


def _assert_same(res, ref, n=5):
    np.testing.assert_array_equal(res.low_res_logits, ref.low_res_logits[:n])  # the same sessions ran
    np.testing.assert_array_equal(res.scores, ref.scores[:n])
    assert res.scores.dtype == np.float32 and res.masks.dtype == bool
    logits = ref.upscale(ref.low_res_logits[:n])
    differ = res.masks != ref.masks[:n]
    assert not (differ & (np.abs(logits) > 1e-4)).any() and differ.mean() < 1e-5


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_every_option_set_gives_the_numpy_paths_results(tiny_dir, reference, name):
    ref_emb, ref = reference
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options=name)
    emb = model.embed(IMAGE)
    assert isinstance(stored_value(emb), ort.OrtValue if OPTION_SETS[name].io_binding else np.ndarray)
    np.testing.assert_array_equal(emb.embeddings, ref_emb.embeddings)
    for n in (len(BOXES), 1, 3):
        _assert_same(model.segment(emb, BOXES[:n]), ref, n)
    report = model.execution_report()
    assert report["cuda_options"]["name"] == name
    if OPTION_SETS[name].io_binding:
        io = report["io_binding"]
        assert io["cuda_graphs"] is False  # nothing is captured on the CPU provider
        where = "graph on the device" if OPTION_SETS[name].device_postprocess else "numpy on the host"
        assert io["postprocess"] == where
        assert io["buckets_built"] == ([1, 4, 8] if OPTION_SETS[name].buckets else [])


def test_numpy_path_reports_no_options(tiny_dir):
    model = MedSAM.load(tiny_dir, precision="fp32")
    assert model.cuda_options is None and model.execution_report()["io_binding"] is None


def test_many_boxes_are_split_into_bucket_chunks(tiny_dir):
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options=CudaOptions("b", buckets=(1, 2, 4)))
    ref_model = MedSAM.load(tiny_dir, precision="fp32")
    boxes = np.concatenate([BOXES, BOXES[::-1], BOXES[:1]])  # 11 boxes: chunks 4 + 4 + 3 (padded to 4)
    _assert_same(model.segment(model.embed(IMAGE), boxes), ref_model.segment(ref_model.embed(IMAGE), boxes), 11)
    assert model.execution_report()["io_binding"]["buckets_built"] == [4]


def test_decoder_calls_are_capped_on_the_cpu(tiny_dir):
    """As the numpy path: at most 16 boxes per decoder call on the CPU (activations grow ~100 MB per box)."""
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="buckets")
    boxes = np.tile(BOXES, (8, 1))  # 40 boxes: 16 + 16 + 8
    ref_model = MedSAM.load(tiny_dir, precision="fp32")
    _assert_same(model.segment(model.embed(IMAGE), boxes), ref_model.segment(ref_model.embed(IMAGE), boxes), 40)
    assert model.execution_report()["io_binding"]["buckets_built"] == [8, 16]


def test_device_masks_in_chunks_for_large_images(tiny_dir, monkeypatch):
    """Masks made on the device are built a bounded number of boxes at a time (here: one box per chunk)."""
    monkeypatch.setattr(runners, "DEVICE_CHUNK_BYTES", 4 * 300 * 700)
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="buckets")
    ref_model = MedSAM.load(tiny_dir, precision="fp32")
    _assert_same(model.segment(model.embed(IMAGE), BOXES), ref_model.segment(ref_model.embed(IMAGE), BOXES))
    assert model.execution_report()["io_binding"]["buckets_built"] == [1]


def test_other_recipes_end_to_end(tiny_dir):
    """MedSAM's original recipe (square resize, postprocess 'resize') through the postprocessing graph."""
    p = postprocess_recipe("resize", 1024)
    graphs = (tiny_dir / "encoder.fp32.onnx", tiny_dir / "decoder.fp32.onnx")
    plain = MedSAM(p, *graphs, model_id="tiny-square")
    bound = MedSAM(
        p, *graphs, model_id="tiny-square", cuda_options="buckets", postprocess_path=tiny_dir / "postprocess.onnx"
    )
    assert bound.execution_report()["io_binding"]["postprocess"] == "graph on the device"
    _assert_same(bound.segment(bound.embed(IMAGE), BOXES), plain.segment(plain.embed(IMAGE), BOXES))


# --------------------------------------------------------------------------------- device-resident embeddings


def test_segment_never_copies_the_embedding_to_the_host(tiny_dir):
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="default", cache=True)
    emb = model.embed(IMAGE)
    model.segment(emb, BOXES)
    assert not has_host_copy(emb)  # nothing read the host copy
    assert model.cache.stats().bytes == stored_value(emb).tensor_size_in_bytes() == 32 * 64 * 64 * 4
    assert model.embed(IMAGE) is emb and not has_host_copy(emb)  # the cache counted without a copy
    host = emb.embeddings
    assert isinstance(host, np.ndarray) and not host.flags.writeable and emb.embeddings is host  # made once


def test_embeddings_move_between_paths(tiny_dir, reference):
    """A device embedding decodes on the numpy path (through its host copy) and a host one on the IO path;
    dataclasses.replace gives a host embedding that segment checks as before."""
    _, ref = reference
    plain = MedSAM.load(tiny_dir, precision="fp32")
    bound = MedSAM.load(tiny_dir, precision="fp32", cuda_options="buckets")
    _assert_same(plain.segment(bound.embed(IMAGE), BOXES), ref)
    _assert_same(bound.segment(plain.embed(IMAGE), BOXES), ref)
    dev = bound.embed(IMAGE)
    moved = replace(dev, model_id=dev.model_id)
    assert isinstance(stored_value(moved), np.ndarray)
    _assert_same(bound.segment(moved, BOXES), ref)
    with pytest.raises(EmbeddingMismatchError, match=r"float32 \(1, 16, 64, 64\)"):
        bound.segment(replace(dev, embeddings=dev.embeddings[:, :16]), BOXES)
    with pytest.raises(EmbeddingMismatchError, match="float64"):
        bound.segment(replace(dev, embeddings=dev.embeddings.astype(np.float64)), BOXES)


def test_embedding_slot_is_copied_only_when_the_image_changes(tiny_dir, reference):
    _, ref = reference
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="buckets")
    a, b = model.embed(IMAGE), model.embed(IMAGE[::-1].copy())
    for emb in (a, a, a, b, b, a):
        model.segment(emb, BOXES[:2])
    assert model.execution_report()["io_binding"]["embedding_slot_copies"] == 3  # a, b, a
    _assert_same(model.segment(a, BOXES), ref)
    host = replace(a, model_id=a.model_id)  # a host array may change in place: copied on every call
    model.segment(host, BOXES[:1])
    model.segment(host, BOXES[:1])
    assert model.execution_report()["io_binding"]["embedding_slot_copies"] == 5


def test_static_encoder_returns_an_embedding_of_its_own(tiny_dir, reference):
    """cuda_graph sets bind the encoder to fixed buffers (on the CPU: not captured); each embed gets its own
    copy, so a later embed does not change an earlier embedding."""
    ref_emb, _ = reference
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="cuda-graph")
    assert model.execution_report()["io_binding"]["static_buffers"] is True
    a = model.embed(IMAGE)
    b = model.embed(rng_image((200, 200, 3), seed=9))
    assert stored_value(a).data_ptr() != stored_value(b).data_ptr()
    np.testing.assert_array_equal(a.embeddings, ref_emb.embeddings)  # read after b: b did not overwrite it
    assert not np.array_equal(a.embeddings, b.embeddings)


def test_copy_into_falls_back_to_the_host(monkeypatch):
    """ONNX Runtime before 1.32 copies into an OrtValue from numpy arrays only."""
    monkeypatch.setattr(ortvalues, "copy_method", "ortvalue")
    src = ort.OrtValue.ortvalue_from_numpy(np.arange(6, dtype=np.float32))
    dst = ort.OrtValue.ortvalue_from_shape_and_type([6], np.float32, "cpu", 0)
    copy_into(dst, src)
    assert ortvalues.copy_method == "ortvalue" and dst.numpy().tolist() == list(range(6))

    class OldOrtValue:  # update_inplace(np.ndarray) only
        def __init__(self):
            self.data = None

        def update_inplace(self, data):
            if not isinstance(data, np.ndarray):
                raise TypeError("update_inplace(): incompatible function arguments")
            self.data = data

    old = OldOrtValue()
    copy_into(old, src)
    assert ortvalues.copy_method == "host round trip" and old.data.tolist() == list(range(6))


def test_threads_share_the_static_buffers_safely(tiny_dir):
    model = MedSAM.load(tiny_dir, precision="fp32", cuda_options="buckets")
    boxes = np.array([[10, 10, 100, 120], [50, 60, 200, 180], [0, 0, 256, 250]], float)
    embs = [model.embed(im) for im in (IMAGE, rng_image((256, 256), seed=4))]
    serial = [model.segment(e, boxes).masks for e in embs]
    results, errors = {}, []

    def work(k):
        try:
            for i in range(6):
                j = (k + i) % 2
                results[(k, i)] = (j, model.segment(embs[j], boxes).masks)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(m, serial[j]) for j, m in results.values()) and len(results) == 24


# ------------------------------------------------------------------------- the postprocessing graph on disk


def test_export_writes_the_postprocessing_graph(tiny_dir):
    from medsam_rt_export.pipeline import sha256_file

    entry = json.loads((tiny_dir / "manifest.json").read_text())["postprocess_graph"]
    assert entry["file"] == "postprocess.onnx" and entry["opset"] == 18
    assert entry["sha256"] == sha256_file(tiny_dir / "postprocess.onnx")
    assert set(entry["inputs"]) == {"low_res_logits", "num_masks", "rows", "cols_t", "mask_threshold"}


@pytest.fixture
def dir_copy(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def test_directories_without_the_graph_postprocess_on_the_host(dir_copy, reference):
    _, ref = reference
    m = json.loads((dir_copy / "manifest.json").read_text())
    del m["postprocess_graph"]
    (dir_copy / "manifest.json").write_text(json.dumps(m))
    (dir_copy / "postprocess.onnx").unlink()
    model = MedSAM.load(dir_copy, precision="fp32", cuda_options="default")
    assert model.execution_report()["io_binding"]["postprocess"] == "numpy on the host"
    _assert_same(model.segment(model.embed(IMAGE), BOXES), ref)


def test_an_altered_postprocessing_graph_is_refused_where_it_is_used(dir_copy):
    with open(dir_copy / "postprocess.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelDirError, match="postprocess.onnx has .* bytes, the manifest says"):
        MedSAM.load(dir_copy, precision="fp32", cuda_options="default")
    MedSAM.load(dir_copy, precision="fp32", cuda_options="host-postprocess")  # not loaded, not checked
    MedSAM.load(dir_copy, precision="fp32")  # the numpy path: neither
    (dir_copy / "postprocess.onnx").unlink()
    with pytest.raises(ModelDirError, match="postprocess.onnx listed in the manifest .* is missing"):
        MedSAM.load(dir_copy, precision="fp32", cuda_options="buckets")
