"""medsam-rt's torch side: load MedSAM checkpoints and export them to ONNX (import name ``medsam_rt_export``).

The runtime (``medsam_rt``) never imports this package; the CLI imports it only for ``export``.
"""

from .pipeline import export_model

__all__ = ["export_model"]
