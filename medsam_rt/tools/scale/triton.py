"""A Triton Inference Server model repository for an exported model directory (``medsam-rt triton``).

Models written (``<repository>/<name>/config.pbtxt`` + ``1/``):

- ``medsam_encoder``, ``medsam_decoder``: the model directory's two graphs as ``onnxruntime``-backend models
  (``1/model.onnx``), inputs and outputs with the names, types and dims of the graphs themselves (read from the
  files, which follow docs/onnx-contract.md; a dynamic dimension is ``-1``). Neither batches across requests:
  the encoder takes one image (``[1, 3, S, S]``), and the decoder's box dimension is dynamic but its embedding
  input is one image's (``[1, C, 64, 64]``), so boxes of different requests (different images) cannot be stacked.
  The box dimension batches within a request: one request decodes all of an image's boxes at once.
  Instance groups: ``count`` instances of ``kind`` CPU or GPU; on GPU the CUDA provider options of a
  :data:`medsam_rt.core.cuda.OPTION_SETS` set (docs/cuda.md).
- ``medsam_embed_decode``: an ensemble, encoder → decoder, for clients that preprocess and postprocess
  themselves (inputs ``pixel_values``, ``boxes`` in the encoder frame; outputs ``low_res_logits``,
  ``iou_scores``).
- ``medsam``: a Python-backend model (BLS, :mod:`medsam_rt.tools.scale.triton_model`): image + boxes in, label image +
  scores out, preprocessing and masks as the runtime does them, the two graphs called through Triton.

The repository's README.md says how to start ``tritonserver`` on it and call each model.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from medsam_rt.core.manifest import PRECISIONS, load_manifest, verify_graph
from medsam_rt.core.targets import target
from medsam_rt.errors import TritonRepositoryError

ENCODER, DECODER, ENSEMBLE, PIPELINE = "medsam_encoder", "medsam_decoder", "medsam_embed_decode", "medsam"
#: Triton's instance-group kinds -> the execution target whose precision preference and option sets apply
KINDS = {"cpu": "cpu", "gpu": "cuda"}
#: ONNX Runtime tensor types -> Triton data types.
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(bool)": "TYPE_BOOL",
}
# the runtime's boxes per decoder call on the CPU (the decoder's activations grow with N)
MAX_BOXES_PER_CALL = 16


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton declares it: name, Triton type, dims (``-1`` for a dynamic dimension)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_io(path: str | os.PathLike[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an ONNX file as ONNX Runtime loads it (symbolic dimensions become ``-1``).

    Raises:
        TritonRepositoryError: a tensor type Triton has no name for here.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the signature is read
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])

    def specs(args) -> list[TensorSpec]:
        out = []
        for a in args:
            if a.type not in TRITON_TYPES:
                raise TritonRepositoryError(f"{Path(path).name}: {a.name} has type {a.type}, not one of {TRITON_TYPES}")
            dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
            out.append(TensorSpec(a.name, TRITON_TYPES[a.type], dims))
        return out

    return specs(session.get_inputs()), specs(session.get_outputs())


def _tensors(key: str, specs: list[TensorSpec]) -> str:
    rows = [
        f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
        for s in specs
    ]
    return f"{key} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _instances(kind: str, count: int) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_{kind.upper()}\n  }}\n]\n"


def onnx_model_config(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], kind: str, instances: int, cuda: dict[str, str]
) -> str:
    """``config.pbtxt`` of one graph on the onnxruntime backend (``max_batch_size: 0``: dims are the full shapes)."""
    text = f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
    text += _tensors("input", inputs) + _tensors("output", outputs) + _instances(kind, instances)
    if kind == "gpu" and cuda:
        accel = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in cuda.items())
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator [\n"
            f'      {{\n        name: "cuda"\n{accel}      }}\n    ]\n  }}\n}}\n'
        )
    # ONNX Runtime picks its threads per session; several instances on one CPU should share the cores
    threads = "0" if kind == "gpu" or instances == 1 else "1"
    return text + _parameters({"intra_op_thread_count": threads})


def ensemble_config(enc_in: list[TensorSpec], dec_in: list[TensorSpec], dec_out: list[TensorSpec]) -> str:
    """The encoder → decoder ensemble: the embedding passes between the steps inside the server."""
    boxes = [s for s in dec_in if s.name != "image_embeddings"]
    text = f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
    text += _tensors("input", enc_in + boxes) + _tensors("output", dec_out)
    enc_map = "".join(f'      input_map {{ key: "{s.name}" value: "{s.name}" }}\n' for s in enc_in)
    dec_map = "".join(f'      input_map {{ key: "{s.name}" value: "{s.name}" }}\n' for s in boxes)
    out_map = "".join(f'      output_map {{ key: "{s.name}" value: "{s.name}" }}\n' for s in dec_out)
    return text + (
        "ensemble_scheduling {\n  step [\n"
        f'    {{\n      model_name: "{ENCODER}"\n      model_version: -1\n{enc_map}'
        '      output_map { key: "image_embeddings" value: "embedding" }\n    },\n'
        f'    {{\n      model_name: "{DECODER}"\n      model_version: -1\n'
        f'      input_map {{ key: "image_embeddings" value: "embedding" }}\n{dec_map}{out_map}    }}\n'
        "  ]\n}\n"
    )


def pipeline_config(instances: int) -> str:
    """The Python-backend (BLS) model: image + boxes → label image + scores."""
    inputs = [TensorSpec("IMAGE", "TYPE_UINT8", (-1, -1, 3)), TensorSpec("BOXES", "TYPE_FP32", (-1, 4))]
    outputs = [TensorSpec("LABELS", "TYPE_UINT16", (-1, -1)), TensorSpec("SCORES", "TYPE_FP32", (-1,))]
    text = f'name: "{PIPELINE}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += _tensors("input", inputs) + _tensors("output", outputs) + _instances("cpu", instances)
    return text + _parameters(
        {"encoder_model": ENCODER, "decoder_model": DECODER, "max_boxes_per_call": str(MAX_BOXES_PER_CALL)}
    )


def write_repository(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    kind: str = "cpu",
    instances: int = 1,
    cuda_options: str = "default",
    force: bool = False,
) -> list[str]:
    """Write the Triton repository of ``model_dir``'s ``precision`` graphs into ``out_dir`` (atomically: built
    beside it and renamed into place); returns the model names.

    Raises:
        ModelDirError: not a model directory, no such precision, or a graph that fails its checksum.
        TritonRepositoryError: bad kind/instances, ``out_dir`` exists (without ``force``), or a graph type
            Triton has no name for.
    """
    if kind not in KINDS:
        raise TritonRepositoryError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(instances, int) or instances < 1:
        raise TritonRepositoryError(f"instances must be an integer >= 1, got {instances!r}")
    if precision not in PRECISIONS:
        raise TritonRepositoryError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    out = Path(out_dir)
    if out.exists() and not force:
        raise TritonRepositoryError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise TritonRepositoryError(f"{out}: folder {out.parent} does not exist")
    manifest = load_manifest(Path(model_dir))
    device = target(KINDS[kind])
    precision = manifest.choose_precision(precision, device.name)
    cuda: dict[str, str] = {}
    if device.option_sets:
        if cuda_options not in device.option_sets:
            known = ", ".join(device.option_sets)
            raise TritonRepositoryError(f"unknown CUDA option set {cuda_options!r}; known: {known}")
        cuda = device.option_sets[cuda_options].provider_options()
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        specs = {}
        for role, name in (("encoder", ENCODER), ("decoder", DECODER)):
            entry = manifest.graph(role, precision)
            verify_graph(entry, full=True)
            version = tmp / name / "1"
            version.mkdir(parents=True)
            _link_or_copy(entry.path, version / "model.onnx")
            specs[role] = graph_io(version / "model.onnx")
            inputs, outputs = specs[role]
            (tmp / name / "config.pbtxt").write_text(
                onnx_model_config(name, inputs, outputs, kind, instances, cuda), encoding="utf-8"
            )
        (tmp / ENSEMBLE / "1").mkdir(parents=True)
        (tmp / ENSEMBLE / "config.pbtxt").write_text(
            ensemble_config(specs["encoder"][0], specs["decoder"][0], specs["decoder"][1]), encoding="utf-8"
        )
        (tmp / PIPELINE / "1").mkdir(parents=True)
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), tmp / PIPELINE / "1" / "model.py")
        shutil.copyfile(manifest.directory / "manifest.json", tmp / PIPELINE / "1" / "manifest.json")
        (tmp / PIPELINE / "config.pbtxt").write_text(pipeline_config(instances), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(manifest, precision, kind, instances, specs), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [ENCODER, DECODER, ENSEMBLE, PIPELINE]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy of a 342 MiB graph
    except OSError:
        shutil.copyfile(src, dst)


def _readme(manifest, precision: str, kind: str, instances: int, specs: dict) -> str:
    def table(role: str) -> str:
        inputs, outputs = specs[role]
        return "\n".join(
            f"| {role} | {'input' if s in inputs else 'output'} | `{s.name}` | {s.data_type} | {list(s.dims)} |"
            for s in inputs + outputs
        )

    p = manifest.preprocessing
    return f"""# Triton model repository for {manifest.raw["model"]["source"]} ({precision})

Written by `medsam-rt triton` from `{manifest.directory}` ({kind.upper()} instances, {instances} per model).
Preprocessing: `{manifest.raw["preprocessing"].get("recipe", "-")}` (encoder input {p.pad_size[0]}x{p.pad_size[1]}).

| model | what it does |
|---|---|
| `{ENCODER}` | the encoder graph (onnxruntime backend): preprocessed image -> embedding |
| `{DECODER}` | the decoder graph (onnxruntime backend): embedding + boxes (encoder frame) -> low-res logits + IoU |
| `{ENSEMBLE}` | ensemble of the two: the embedding stays in the server |
| `{PIPELINE}` | Python backend (BLS): RGB image + boxes (image pixels) -> uint16 label image + scores |

| graph | direction | name | type | dims |
|---|---|---|---|---|
{table("encoder")}
{table("decoder")}

No model batches across requests (max_batch_size 0): the encoder takes one image, and the decoder's embedding
input belongs to one image, so only one request's own boxes are decoded together (send all of an image's boxes
in one request). Throughput comes from instances (`instance_group` count) and from many requests in flight.

## Start the server

```
docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
    -v $PWD:/models -v $PWD/../wheels:/wheels nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
    bash -c "pip install /wheels/*.whl && tritonserver --model-repository=/models"
```

(CPU only: drop `--gpus all`.) The `{PIPELINE}` model imports `medsam_rt` in Triton's Python backend: put a
medsam-rt wheel (`pip wheel --no-deps PATH_TO_MEDSAM_RT`) in a `wheels/` folder beside this repository (not
inside it: Triton takes every folder here for a model), or drop the pip install and the `{PIPELINE}` folder when
only the graph models are served; those need nothing but the server. `curl localhost:8000/v2/health/ready`
answers 200 when the models are loaded.

## Call it

```python
import numpy as np, tritonclient.http as http
from PIL import Image

client = http.InferenceServerClient("localhost:8000")
image = np.asarray(Image.open("scan.png").convert("RGB"))                 # uint8 [H, W, 3]
boxes = np.array([[30, 40, 120, 160]], np.float32)                          # x0, y0, x1, y1 in pixels
inputs = [http.InferInput("IMAGE", list(image.shape), "UINT8"), http.InferInput("BOXES", list(boxes.shape), "FP32")]
inputs[0].set_data_from_numpy(image)
inputs[1].set_data_from_numpy(boxes)
result = client.infer("{PIPELINE}", inputs)
labels, scores = result.as_numpy("LABELS"), result.as_numpy("SCORES")    # [H, W] uint16, [N] float32
```

`{ENSEMBLE}` and the two graph models take the contract's tensors (docs/onnx-contract.md of medsam-rt): a client
that calls them preprocesses the image (`pixel_values`) and scales the boxes into the encoder frame itself, and
turns `low_res_logits` into masks with the recipe's postprocessing.

## Not checked without a server

The configs were parsed with Triton's model-config schema and each graph was loaded in ONNX Runtime with exactly
the declared inputs, outputs and dims; the `{PIPELINE}` model's code was run against ONNX Runtime sessions standing
in for the two graph models. No `tritonserver` ran on them.
"""


__all__ = [
    "DECODER",
    "ENCODER",
    "ENSEMBLE",
    "KINDS",
    "PIPELINE",
    "TensorSpec",
    "TritonRepositoryError",
    "ensemble_config",
    "graph_io",
    "onnx_model_config",
    "pipeline_config",
    "write_repository",
]
