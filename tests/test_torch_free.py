"""The runtime imports and runs with torch, transformers and the export package blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import rng_image
from PIL import Image

BLOCKER = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "medsam_rt_export", "optimum", "onnx"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    """
)


def test_runtime_runs_without_torch(tiny_dir, tmp_path):
    Image.fromarray(rng_image((90, 120, 3))).save(tmp_path / "img.png")
    code = BLOCKER + textwrap.dedent(
        f"""
        import medsam_rt
        from medsam_rt.tools.cli import main
        model = medsam_rt.MedSAM.load({str(tiny_dir)!r})
        res = model.segment(model.embed({str(tmp_path / "img.png")!r}), [[5, 5, 60, 70], [30, 20, 110, 85]])
        assert res.masks.shape == (2, 90, 120)
        rc = main(["segment", {str(tiny_dir)!r}, {str(tmp_path / "img.png")!r}, "--box", "5,5,60,70",
                   "--out", {str(tmp_path / "m.png")!r}])
        assert rc == 0
        rc = main(["export", "--random-weights", "--out", {str(tmp_path / "x")!r}])
        assert rc == 2  # clean error naming the missing extra
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("TORCH-FREE OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "TORCH-FREE OK" in r.stdout
    assert "needs the export extra" in r.stderr
