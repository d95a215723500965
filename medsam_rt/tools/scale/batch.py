"""``medsam-rt batch``: a job list (see :mod:`medsam_rt.tools.scale.jobs`) through a pool of loaded models.

One driver, two engines: ``local`` (a process pool on this machine) and ``ray`` (Ray Data, an actor pool: see
:mod:`medsam_rt.tools.scale.ray_engine`). Both run every job with :func:`~medsam_rt.tools.scale.jobs.run_job` in a
:class:`Worker` that holds one loaded :class:`~medsam_rt.MedSAM`, so their outputs are the same files.

The driver owns the output folder:

- a lock (``OUT_DIR/.batch.lock``, released when the process ends, however it ends) keeps a second run out;
- temporary files left by a run that was killed while writing (``.NAME.XXXXXXXXXXXX.tmp*``: every output is
  written beside its name and renamed into place) are removed at the start;
- with ``resume`` (default) a job whose output exists is skipped, so a killed run continues where it stopped;
- ``failures.jsonl`` lists this run's failed jobs (``{"id", "error", "image"}``), one line as each fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from medsam_rt.core.manifest import load_manifest
from medsam_rt.core.providers import physical_cores
from medsam_rt.errors import BatchError, BatchUsageError, MedSAMError
from medsam_rt.tools.progress import Progress
from medsam_rt.tools.scale.jobs import Job, JobOutcome, read_jobs, run_job

ENGINES = ("local", "ray")
FAILURES_FILE = "failures.jsonl"
LOCK_FILE = ".batch.lock"
# atomic_write's temporary names: ".<name>.<12 hex>.tmp<suffix>"
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp[^/]*$")


@dataclass(frozen=True)
class ModelSpec:
    """How each worker loads its model: :meth:`MedSAM.load` arguments (``threads``: intra-op threads)."""

    model_dir: str
    device: str = "cpu"
    precision: str = "auto"
    threads: int | None = None


class Worker:
    """One loaded model running jobs; the model loads on the first job (so that a load error is reported once,
    as :class:`BatchError`, instead of as every job's failure)."""

    def __init__(self, spec: ModelSpec, out_dir: str | os.PathLike[str]) -> None:
        self.spec = spec
        self.out_dir = Path(out_dir)
        self._model = None

    def model(self):
        if self._model is None:
            from medsam_rt import MedSAM

            s = self.spec
            self._model = MedSAM.load(s.model_dir, device=s.device, precision=s.precision, threads=s.threads)
        return self._model

    def run(self, job: Job) -> JobOutcome:
        """Run ``job``; its failure (any exception from its input) is the outcome, not raised.

        Raises:
            BatchError: the model does not load.
        """
        try:
            model = self.model()
        except Exception as exc:
            raise BatchError(f"the model did not load in a worker: {_message(exc)}") from None
        start = time.perf_counter()
        try:
            stages = run_job(model, job, self.out_dir)
        except Exception as exc:  # the job's input: every error is this job's failure, the others go on
            return _outcome(job, "failed", error=_message(exc), seconds=time.perf_counter() - start)
        return _outcome(job, "ok", seconds=time.perf_counter() - start, stages=stages)


def _outcome(job: Job, status: str, **kwargs) -> JobOutcome:
    return JobOutcome(job.id, job.output_name, status, worker=os.getpid(), image=job.image, **kwargs)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    return text if isinstance(exc, MedSAMError) else f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class BatchSummary:
    """The result of a run.

    Attributes:
        engine, workers, threads: how it ran (``threads``: intra-op threads per worker).
        jobs: entries in the job list; succeeded, failed, skipped (output already there): how they ended.
        seconds: wall time from start (engine start included) to the last outcome; ``startup``: of which engine
            start until the first outcome came back.
        throughput: jobs run (succeeded + failed) per second of ``seconds``; ``steady_throughput``: the jobs
            after the first per second from the first outcome to the last (engine start left out; 0 for one job).
        stages: seconds per stage summed over the jobs run (see :class:`~medsam_rt.tools.scale.jobs.JobOutcome`).
        failures: path of ``failures.jsonl``.
    """

    engine: str
    workers: int
    threads: int | None
    jobs: int
    succeeded: int
    failed: int
    skipped: int
    seconds: float
    startup: float
    throughput: float
    steady_throughput: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    failures: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()} | {
            "stages": {k: round(v, 4) for k, v in self.stages.items()}
        }


def default_threads(workers: int) -> int:
    """Intra-op threads per worker so that ``workers`` do not oversubscribe this machine's physical cores (the
    cores :meth:`MedSAM.load` uses by default: SMT siblings counted once)."""
    return max(1, physical_cores() // workers)


def run_batch(
    model_dir: str | os.PathLike[str],
    jobs: str | os.PathLike[str] | Iterable[Job],
    out_dir: str | os.PathLike[str],
    *,
    engine: str = "local",
    workers: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    address: str | None = None,
    resume: bool = True,
    progress: bool = False,
    on_outcome: Callable[[JobOutcome], None] | None = None,
) -> BatchSummary:
    """Run every job of ``jobs`` (a JSONL file, a folder of npz cases or :class:`Job` objects) into ``out_dir``.

    Args:
        engine: ``"local"`` (a process pool) or ``"ray"`` (Ray Data; a local Ray instance unless ``address``
            names a cluster, or Ray is already initialised in this process).
        workers: models loaded at once (processes, or Ray actors).
        threads: intra-op threads per worker (default: this machine's cores // workers; Ray actors reserve
            that many CPUs).
        resume: skip jobs whose output exists (else they are run again and replaced).
        progress: draw a progress bar on stderr when it is a terminal.
        on_outcome: called in this process with each job's outcome as it comes back.

    Raises:
        BatchUsageError: bad option, output folder in use by another run or not a folder, Ray not installed.
        JobListError: the job list is missing, empty or has two jobs writing one file.
        ModelDirError: ``model_dir`` is not a model directory.
        BatchError: the model failed to load in a worker, or the engine failed.
    """
    if engine not in ENGINES:
        raise BatchUsageError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if not isinstance(workers, int) or workers < 1:
        raise BatchUsageError(f"workers must be an integer >= 1, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BatchUsageError(f"threads must be an integer >= 1, got {threads!r}")
    if address is not None and engine != "ray":
        raise BatchUsageError("an address applies to the ray engine")
    started = time.perf_counter()
    load_manifest(Path(model_dir))  # a wrong model dir is a usage error here, not every worker's failure
    job_list = read_jobs(jobs) if isinstance(jobs, (str, os.PathLike)) else list(jobs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BatchUsageError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or default_threads(workers)
    spec = ModelSpec(os.fspath(Path(model_dir).resolve()), device, precision, threads)
    with _lock(out):
        _remove_stale_temporaries(out)
        todo, skipped = [], 0
        failures_path = out / FAILURES_FILE
        counts = {"ok": 0, "failed": 0}
        stages: dict[str, float] = {}
        times: list[float] = []  # when each of the engine's outcomes arrived
        with (
            open(failures_path, "w", encoding="utf-8") as failures,
            Progress(len(job_list), "batch", enabled=progress) as bar,
        ):

            def record(outcome: JobOutcome) -> None:
                if outcome.status == "failed":
                    _write_failure(failures, outcome)
                if outcome.status in counts:
                    counts[outcome.status] += 1
                for name, seconds in outcome.stages.items():
                    stages[name] = stages.get(name, 0.0) + seconds
                bar.update(note=f"{counts['ok']} ok, {counts['failed']} failed")
                if on_outcome is not None:
                    on_outcome(outcome)

            for job in job_list:
                if job.problem is not None:
                    record(JobOutcome(job.id, job.output_name, "failed", error=job.problem, image=job.image or None))
                elif resume and (out / job.output_name).exists():
                    skipped += 1
                    bar.update(note="skipping finished jobs")
                    if on_outcome is not None:
                        on_outcome(JobOutcome(job.id, job.output_name, "skipped", image=job.image))
                else:
                    todo.append(job)
            engine_start = time.perf_counter()
            if todo:
                run = _run_local if engine == "local" else _run_ray
                for outcome in run(todo, spec, out, workers, address):
                    times.append(time.perf_counter())
                    record(outcome)
        seconds = time.perf_counter() - started
        ran = counts["ok"] + counts["failed"]
    return BatchSummary(
        engine=engine,
        workers=workers,
        threads=threads,
        jobs=len(job_list),
        succeeded=counts["ok"],
        failed=counts["failed"],
        skipped=skipped,
        seconds=seconds,
        startup=(times[0] if times else time.perf_counter()) - engine_start,
        throughput=ran / seconds if seconds > 0 else 0.0,
        steady_throughput=(len(times) - 1) / (times[-1] - times[0]) if times and times[-1] > times[0] else 0.0,
        stages=stages,
        failures=os.fspath(failures_path),
    )


def _write_failure(failures: IO[str], outcome: JobOutcome) -> None:
    failures.write(json.dumps({"id": outcome.id, "error": outcome.error, "image": outcome.image}) + "\n")
    failures.flush()


class _lock:
    """An exclusive ``flock`` on ``OUT_DIR/.batch.lock`` for the run (the kernel drops it when the process dies)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE

    def __enter__(self) -> _lock:
        self.fh = open(self.path, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise BatchUsageError(f"another batch run is writing to {self.path.parent} ({LOCK_FILE})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _remove_stale_temporaries(out: Path) -> None:
    for path in out.iterdir():
        if _TEMP.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- local engine

_WORKER: Worker | None = None


def _init_local(spec: ModelSpec, out: str) -> None:
    global _WORKER
    _WORKER = Worker(spec, out)


def _run_in_local(job: Job) -> JobOutcome:
    assert _WORKER is not None  # set by the pool's initializer
    return _WORKER.run(job)


def _run_local(todo: list[Job], spec: ModelSpec, out: Path, workers: int, address: str | None) -> Iterator[JobOutcome]:
    """A process pool (spawned: no inherited threads or sessions), one :class:`Worker` per process, at most two
    jobs in flight per worker. A worker that dies (killed, out of memory) fails the jobs it had in flight; the
    pool is started again for the rest."""
    queue = list(reversed(todo))
    context = multiprocessing.get_context("spawn")
    while queue:
        pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_local, initargs=(spec, str(out)))
        pending: dict[cf.Future, Job] = {}
        broken = False
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers and not broken:
                    job = queue.pop()
                    pending[pool.submit(_run_in_local, job)] = job
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        yield future.result()
                    except cf.process.BrokenProcessPool as exc:
                        broken = True
                        yield _outcome(job, "failed", error=f"its worker process died ({exc})")
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)


def _run_ray(todo: list[Job], spec: ModelSpec, out: Path, workers: int, address: str | None) -> Iterator[JobOutcome]:
    from medsam_rt.tools.scale.ray_engine import run_ray

    return run_ray(todo, spec, out, workers, address)


def print_summary(summary: BatchSummary, stream: IO[str] | None = None) -> None:
    """The summary as a few lines (``medsam-rt batch``'s output)."""
    stream = stream or sys.stdout
    s = summary
    ran = s.succeeded + s.failed
    print(
        f"{s.jobs} job(s): {s.succeeded} ok, {s.failed} failed, {s.skipped} skipped (output existed); "
        f"{ran} run in {s.seconds:.1f} s = {s.throughput:.2f} jobs/s ({s.engine}, {s.workers} worker(s) x "
        f"{s.threads} thread(s); first result after {s.startup:.1f} s)",
        file=stream,
    )
    if s.stages and ran:
        per = ", ".join(f"{k} {v:.1f} s ({v / ran * 1000:.0f} ms/job)" for k, v in s.stages.items())
        print(f"time in workers: {per}", file=stream)
    if s.failed:
        print(f"failures: {s.failures}", file=stream)


__all__ = [
    "ENGINES",
    "FAILURES_FILE",
    "BatchError",
    "BatchSummary",
    "BatchUsageError",
    "ModelSpec",
    "Worker",
    "default_threads",
    "print_summary",
    "run_batch",
]
