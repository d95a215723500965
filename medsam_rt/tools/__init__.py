"""CLI and tools on top of the runtime: the ``medsam-rt`` command (``cli``), ``info``, ``demo``, ``bench``, the
sample images (``samples``), memory budgets (``budget``), the HTTP server (``serve``) and batch jobs / Triton
(``scale``). Map: ``docs/architecture.md``."""
