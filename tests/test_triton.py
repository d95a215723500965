"""The Triton model repository of ``medsam-rt triton``: every config.pbtxt parsed with Triton's own model-config
schema (``tritonclient``), every graph loaded in ONNX Runtime with exactly the declared inputs, outputs and dims,
the ensemble's wiring checked against the step models, and the Python (BLS) model's code run with ONNX Runtime
sessions of the repository's graph models standing in for Triton's ``InferenceRequest.exec``: its label images
equal ``MedSAM.segment``'s. No tritonserver runs here (it cannot be installed on these machines)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

# Triton's model-config schema: tritonclient[grpc] is a dev dependency, so a missing one fails collection loudly
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from medsam_rt import MedSAM
from medsam_rt.errors import ModelDirError
from medsam_rt.tools.cli import main
from medsam_rt.tools.samples import real_samples, two_ellipse_phantom
from medsam_rt.tools.scale.triton import DECODER, ENCODER, ENSEMBLE, PIPELINE, TritonRepositoryError, write_repository

ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL"}


def parse(path: Path):
    """A config.pbtxt as Triton reads it (unknown fields or bad enums raise ParseError)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def type_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


@pytest.fixture(scope="module")
def repo(lite_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert write_repository(lite_dir, out) == [ENCODER, DECODER, ENSEMBLE, PIPELINE]
    return out


def test_every_config_parses_with_tritons_schema(repo, lite_dir, tmp_path):
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted([ENCODER, DECODER, ENSEMBLE, PIPELINE])
    for name, cfg in configs.items():
        assert cfg.name == name and cfg.max_batch_size == 0
        assert (repo / name / "1").is_dir()
    assert configs[ENCODER].backend == configs[DECODER].backend == "onnxruntime"
    assert configs[ENSEMBLE].platform == "ensemble" and configs[PIPELINE].backend == "python"
    for name in (ENCODER, DECODER, PIPELINE):
        (group,) = configs[name].instance_group
        assert (model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind), group.count) == ("KIND_CPU", 1)
    assert not configs[ENCODER].HasField("optimization")
    assert configs[ENCODER].parameters["intra_op_thread_count"].string_value == "0"
    params = {k: v.string_value for k, v in configs[PIPELINE].parameters.items()}
    assert params == {"encoder_model": ENCODER, "decoder_model": DECODER, "max_boxes_per_call": "16"}
    assert (repo / PIPELINE / "1" / "model.py").is_file()
    assert json.loads((repo / PIPELINE / "1" / "manifest.json").read_text()) == json.loads(
        (lite_dir / "manifest.json").read_text()
    )
    assert "tritonserver --model-repository" in (repo / "README.md").read_text()

    # GPU instances: the CUDA provider options of the chosen medsam_rt.core.cuda option set
    from medsam_rt.core.cuda import OPTION_SETS

    gpu = tmp_path / "gpu"
    write_repository(lite_dir, gpu, kind="gpu", instances=2, cuda_options="heuristic-conv")
    for name in (ENCODER, DECODER):
        cfg = parse(gpu / name / "config.pbtxt")
        (group,) = cfg.instance_group
        assert (model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind), group.count) == ("KIND_GPU", 2)
        (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert accel.name == "cuda"
        assert dict(accel.parameters) == OPTION_SETS["heuristic-conv"].provider_options()
        assert dict(accel.parameters)["cudnn_conv_algo_search"] == "HEURISTIC"
    # several CPU instances share the cores: one intra-op thread each
    cpu2 = tmp_path / "cpu2"
    write_repository(lite_dir, cpu2, instances=3)
    assert parse(cpu2 / ENCODER / "config.pbtxt").parameters["intra_op_thread_count"].string_value == "1"


def declared(cfg, key: str) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (type_name(t.data_type), list(t.dims)) for t in getattr(cfg, key)}


def loaded(args) -> dict[str, tuple[str, list[int]]]:
    return {a.name: (ORT_TYPES[a.type], [d if isinstance(d, int) else -1 for d in a.shape]) for a in args}


def test_graph_models_load_with_exactly_the_declared_io(repo, lite_dir):
    for name in (ENCODER, DECODER):
        cfg = parse(repo / name / "config.pbtxt")
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert declared(cfg, "input") == loaded(session.get_inputs())
        assert declared(cfg, "output") == loaded(session.get_outputs())
    enc = declared(parse(repo / ENCODER / "config.pbtxt"), "input")
    assert enc == {"pixel_values": ("TYPE_FP32", [1, 3, 256, 256])}  # LiteMedSAM: 256x256 encoder input
    dec_in = declared(parse(repo / DECODER / "config.pbtxt"), "input")
    dec_out = declared(parse(repo / DECODER / "config.pbtxt"), "output")
    assert dec_in == {"image_embeddings": ("TYPE_FP32", [1, 256, 64, 64]), "boxes": ("TYPE_FP32", [-1, 4])}
    assert dec_out == {"low_res_logits": ("TYPE_FP32", [-1, 1, 256, 256]), "iou_scores": ("TYPE_FP32", [-1, 1])}
    # the copies are the model directory's graphs
    manifest = json.loads((lite_dir / "manifest.json").read_text())
    for name, role in ((ENCODER, "encoder"), (DECODER, "decoder")):
        assert (repo / name / "1" / "model.onnx").read_bytes() == (
            lite_dir / manifest["graphs"][role]["fp32"]["file"]
        ).read_bytes()


def test_ensemble_wiring_matches_its_steps(repo):
    ens = parse(repo / ENSEMBLE / "config.pbtxt")
    available = declared(ens, "input")  # tensor name -> (type, dims) known at each point
    for step in ens.ensemble_scheduling.step:
        cfg = parse(repo / step.model_name / "config.pbtxt")
        inputs, outputs = declared(cfg, "input"), declared(cfg, "output")
        assert set(step.input_map) == set(inputs), step.model_name  # every input fed, no unknown one
        for model_input, tensor in step.input_map.items():
            assert available[tensor] == inputs[model_input], (step.model_name, model_input)
        for model_output, tensor in step.output_map.items():
            available[tensor] = outputs[model_output]
    for name, spec in declared(ens, "output").items():
        assert available[name] == spec


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors, error=None) -> None:
        self.outputs = {t.name(): t for t in output_tensors}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error


def triton_stand_in(repo: Path) -> types.ModuleType:
    """``triton_python_backend_utils`` with each graph model served by an ONNX Runtime session of the repository's
    own model file (what Triton's onnxruntime backend runs), its feeds checked against the declared config."""
    sessions, configs = {}, {}
    for name in (ENCODER, DECODER):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), options, ["CPUExecutionProvider"])
        configs[name] = parse(repo / name / "config.pbtxt")

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[_Tensor]) -> None:
            self.model, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self) -> _Response:
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            spec = declared(configs[self.model], "input")
            assert set(feeds) == set(spec)
            for k, v in feeds.items():
                assert v.dtype == np.float32 and len(v.shape) == len(spec[k][1])
                assert all(d == -1 or d == s for d, s in zip(spec[k][1], v.shape, strict=True))
            values = sessions[self.model].run(self.outputs, feeds)
            return _Response([_Tensor(n, v) for n, v in zip(self.outputs, values, strict=True)])

    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor
    module.InferenceRequest = InferenceRequest
    module.InferenceResponse = _Response
    module.TritonError = _Error
    module.get_input_tensor_by_name = lambda request, name: request.inputs[name]
    module.get_output_tensor_by_name = lambda response, name: response.outputs[name]
    return module


class _Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}


def test_pipeline_model_gives_segments_label_images(repo, lite_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", triton_stand_in(repo))
    spec = importlib.util.spec_from_file_location("medsam_triton_model", repo / PIPELINE / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bls = module.TritonPythonModel()
    config = json_format.MessageToDict(parse(repo / PIPELINE / "config.pbtxt"), preserving_proto_field_name=True)
    bls.initialize({"model_config": json.dumps(config)})

    model = MedSAM.load(lite_dir, precision="fp32", threads=1)
    ct = real_samples()[0]  # CT_small.dcm, soft-tissue window
    rng = np.random.default_rng(3)
    x0, y0 = rng.integers(0, 90, 18), rng.integers(0, 90, 18)
    many = np.stack([x0, y0, x0 + rng.integers(15, 38, 18), y0 + rng.integers(15, 38, 18)], 1).astype(np.float32)
    two = two_ellipse_phantom()
    cases = [(ct.image, ct.boxes), (ct.image, many), (two.image, two.boxes)]  # 18 boxes: two decoder calls
    requests = [_Request(IMAGE=np.repeat(img[..., None], 3, 2), BOXES=np.asarray(b, np.float32)) for img, b in cases]
    requests.append(_Request(IMAGE=np.repeat(ct.image[..., None], 3, 2), BOXES=np.array([[0, 0, 500, 20]], np.float32)))
    responses = bls.execute(requests)
    assert len(responses) == 4
    for (image, boxes), response in zip(cases, responses[:3], strict=False):
        assert not response.has_error()
        seg = model.segment(model.embed(image), boxes)
        labels = response.outputs["LABELS"].as_numpy()
        assert labels.dtype == np.uint16 and labels.shape == image.shape
        np.testing.assert_array_equal(labels, seg.label_image())
        np.testing.assert_array_equal(response.outputs["SCORES"].as_numpy(), seg.scores)
        assert len(np.unique(labels)) > 1
    assert responses[3].has_error() and "outside" in responses[3].error().message()  # this request only


def test_repository_errors(lite_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    out.mkdir()
    with pytest.raises(TritonRepositoryError, match="exists; pass --force"):
        write_repository(lite_dir, out)
    assert main(["triton", str(lite_dir), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["triton", str(lite_dir), str(out), "--force"]) == 0
    assert parse(out / DECODER / "config.pbtxt").name == DECODER
    with pytest.raises(TritonRepositoryError, match="instances"):
        write_repository(lite_dir, tmp_path / "x", instances=0)
    with pytest.raises(TritonRepositoryError, match="unknown CUDA option set"):
        write_repository(lite_dir, tmp_path / "x", kind="gpu", cuda_options="fastest")
    with pytest.raises(ModelDirError):
        write_repository(tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))  # nothing left half-written
