"""Medical I/O and outputs: DICOM/NIfTI scans and series (``formats``, ``series``, ``medical``), result writers
(``results``, ``labelvolume``), figures (``overlay``), the CVPR24 metrics and challenge protocol (``metrics``,
``challenge``). Built on ``medsam_rt.core``; pydicom, nibabel, scipy and scikit-image are imported lazily where an
extra provides them. Map: ``docs/architecture.md``."""
