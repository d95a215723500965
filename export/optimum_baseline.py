"""The route a user would take instead of medsam-rt: optimum's ONNX export of the same ``SamModel``.

``python -m medsam_rt_export.optimum_baseline MODEL_DIR OUT_DIR`` rebuilds the model behind a medsam-rt model
directory, saves it as a transformers directory and runs ``optimum.exporters.onnx.main_export`` on it (SAM's
"split" variant: ``vision_encoder.onnx`` + ``prompt_encoder_mask_decoder.onnx``). optimum-onnx pins
transformers < 4.58, so this runs in a side environment (``make bench`` uses ``.venv-tf4``); the graphs it
writes are then timed by ``medsam-rt bench`` with ONNX Runtime alone.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from medsam_rt.errors import ExportError

from .bench import source_of

FILES = ("vision_encoder.onnx", "prompt_encoder_mask_decoder.onnx")


def export_optimum(model_dir: Path, out: Path) -> Path:
    """Export the model behind ``model_dir`` with optimum into ``out`` (replaced atomically); return ``out``."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ExportError(f"optimum-onnx is not installed here ({exc}); it needs transformers < 4.58") from None
    from transformers import SamModel

    source, manifest = source_of(model_dir)
    if not isinstance(source.model, SamModel):
        name = manifest["model"]["source"]
        raise ExportError(f"optimum exports transformers SamModel checkpoints; {name} is not one")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".optimum-", dir=out.resolve().parent) as tmp:
        hf_dir, onnx_dir = Path(tmp) / "hf", Path(tmp) / "onnx"
        source.model.save_pretrained(hf_dir)
        main_export(str(hf_dir), str(onnx_dir), task="feature-extraction", opset=18, device="cpu", do_validation=False)
        missing = [f for f in FILES if not (onnx_dir / f).is_file()]
        if missing:
            raise ExportError(f"optimum wrote no {', '.join(missing)} in {onnx_dir}")
        (onnx_dir / "source.txt").write_text(manifest["model"]["checksum"] + "\n")
        if out.exists():
            shutil.rmtree(out)
        onnx_dir.rename(out)
    return out


if __name__ == "__main__":
    export_optimum(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")
