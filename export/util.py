"""Small helpers shared by the export modules (the runtime's, so both sides agree)."""

from medsam_rt.core.util import one_line, sha256_file

__all__ = ["one_line", "sha256_file"]
