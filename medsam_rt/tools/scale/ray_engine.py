"""The ``ray`` engine of ``medsam-rt batch``: Ray Data over the job list, an actor pool of loaded models.

The job list becomes a dataset (one row a job, the job as JSON: jobs mix 2-D and 3-D boxes, which one Arrow schema
would not hold), ``map_batches`` runs it through :class:`RaySegmenter` actors (``ActorPoolStrategy(size=workers)``,
``num_cpus`` = threads per actor, ``num_gpus=1`` on CUDA), each holding one
:class:`~medsam_rt.tools.scale.batch.Worker`, and the driver iterates the results as they stream back (Ray Data's
streaming executor: jobs are read, run and returned as a pipeline, memory bounded by its queues, not by the job
count). Outputs are written by the actors, so on a cluster ``OUT_DIR`` and the inputs must be on a file system every
node sees, and every node needs medsam-rt installed (or a ``runtime_env``) and the model directory at the same path.

Ray starts here unless it is already initialised: with ``address`` it joins that cluster, else it starts a
local instance bounded to ``workers * threads`` CPUs, without the dashboard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medsam_rt.core.targets import TARGETS
from medsam_rt.tools.scale.batch import BatchError, BatchUsageError, ModelSpec, Worker
from medsam_rt.tools.scale.jobs import Job, JobOutcome


class RaySegmenter:
    """Ray Data's callable class: one loaded model per actor, ``__call__`` maps a batch of jobs to outcomes."""

    def __init__(self, spec: ModelSpec, out_dir: str) -> None:
        self.worker = Worker(spec, out_dir)
        self.error: str | None = None
        try:
            self.worker.model()
        except Exception as exc:  # reported by the driver once, as a BatchError
            self.error = f"the model did not load in a Ray actor: {type(exc).__name__}: {exc}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for text in batch["job"]:
            if self.error is not None:
                outcomes.append(json.dumps({"fatal": self.error}))
                continue
            outcomes.append(json.dumps(self.worker.run(Job.from_dict(json.loads(text))).to_dict()))
        return {"outcome": np.array(outcomes, dtype=object)}


def run_ray(todo: list[Job], spec: ModelSpec, out: Path, workers: int, address: str | None) -> Iterator[JobOutcome]:
    """Run ``todo`` on Ray, yielding each outcome as it streams back (in completion order)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise BatchUsageError(f"--engine ray needs the ray extra (pip install 'medsam-rt[ray]'): {exc}") from None
    threads = spec.threads or 1
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(
                num_cpus=workers * threads, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
            )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver draws one bar for the run
    context.print_on_execution_start = False
    rows = [{"job": json.dumps(job.to_dict())} for job in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64 * workers))
    results = dataset.map_batches(
        RaySegmenter,
        fn_constructor_kwargs={"spec": spec, "out_dir": str(out)},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
        num_gpus=getattr(TARGETS.get(spec.device), "gpus", 0) or None,  # "auto" asks for none
    )
    try:
        for row in results.iter_rows():
            data = json.loads(row["outcome"])
            if "fatal" in data:
                raise BatchError(data["fatal"])
            yield JobOutcome.from_dict(data)
    except ray.exceptions.RayError as exc:
        raise BatchError(f"Ray failed: {' '.join(str(exc).split())[:500]}") from None


__all__ = ["RaySegmenter", "run_ray"]
