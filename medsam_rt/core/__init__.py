"""The runtime core: the ``MedSAM`` facade (``model``), the engine seam (``runners``), execution targets
(``targets``, ``providers``, ``cuda``), embeddings and their cache, preprocessing, postprocessing and masks, the
manifest and the load-time precision check; numpy, ONNX Runtime and Pillow only. It imports nothing from
``medsam_rt.io`` or ``medsam_rt.tools`` (``tests/test_layout.py``). Map: ``docs/architecture.md``."""
