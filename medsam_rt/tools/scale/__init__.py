"""Beyond one process: ``medsam-rt batch`` (a job list on a local process pool or on Ray Data) and a Triton
model repository (``medsam-rt triton``). Uses only medsam-rt's public API and its readers and writers.

>>> from medsam_rt.tools.scale import run_batch
>>> summary = run_batch("models/litemedsam", "jobs.jsonl", "out/", engine="local", workers=2)
>>> summary.failed, summary.throughput

See docs/scale.md.
"""

from medsam_rt.tools.scale.batch import ENGINES, BatchError, BatchSummary, BatchUsageError, ModelSpec, Worker, run_batch
from medsam_rt.tools.scale.jobs import Job, JobError, JobListError, JobOutcome, read_jobs, run_job

__all__ = [
    "ENGINES",
    "BatchError",
    "BatchSummary",
    "BatchUsageError",
    "Job",
    "JobError",
    "JobListError",
    "JobOutcome",
    "ModelSpec",
    "Worker",
    "read_jobs",
    "run_batch",
    "run_job",
]
