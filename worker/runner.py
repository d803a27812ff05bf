"""Running one job: claim the row, heartbeat, call the engine, store the artifacts, record the outcome."""
import importlib.metadata
import json
import logging
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.publish import publish
from engine.context import (
    Cancelled,
    DatasetInput,
    JobContext,
    MergeInputs,
    ModelSpec,
    Progress,
    TaskVectorInput,
)
from engine.cost import JobEstimate
from engine.methods.catalogue import get_method
from engine.running import EvaluationItem, estimate_evaluation, estimate_inputs, evaluate, run_method
from engine.safetensors_io import read_header
from store import jobs
from store.blobs import get_blob_store, through_storage_outages
from store.db import is_transient, session_scope, transact
from store.ids import new_id
from store.jobs import JobStatus
from store.models import BaseModel, Checkpoint, Dataset, Job, JobKind, TaskVector
from tvforge.settings import Settings, get_settings

log = logging.getLogger(__name__)
PROGRESS_MIN_INTERVAL_S = 0.5


def through_outages(settings: Settings) -> float:
    """How long the job's own reads and writes are retried while the database is unreachable (a restart, a
    fail-over): a job that has done its work must not be failed, or its result lost, for a blip. Past the
    heartbeat timeout the reaper takes the job as lost anyway, and the conditional transitions then refuse
    this worker's late write."""
    return settings.heartbeat_timeout_s


def claim(job_id: str, worker_id: str, settings: Settings) -> bool:
    """Take the job (store.jobs.claim): of two deliveries of one id, one wins."""
    return transact(lambda session: jobs.claim(session, job_id, worker_id,
                                               jobs.stale_before(session, settings.heartbeat_timeout_s),
                                               settings.max_attempts, settings.job_time_limit_s),
                    through_outages(settings))


class Heartbeat(threading.Thread):
    """Touches the row while the job runs, and watches for a cancel request and for losing the job.

    The job counts as lost when a beat finds it held by no one or by another worker, and also when no beat has
    reached the database for timeout_s less one interval: by then the reaper may hand the job to another worker,
    so this one stops rather than run beside it (its late writes would be refused anyway)."""

    def __init__(self, job_id: str, worker_id: str, interval_s: float, timeout_s: float,
                 keep_fresh: Callable[[], None] | None = None, worker_stopping: Callable[[], bool] | None = None):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.worker_id, self.interval_s = job_id, worker_id, interval_s
        self.give_up_after_s = max(interval_s, timeout_s - interval_s)
        self.keep_fresh = keep_fresh
        self.worker_stopping = worker_stopping
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self.released = threading.Event()  # the worker is shutting down: stop, and hand the job back
        self._stop_event = threading.Event()

    def stop_requested(self) -> bool:
        """What the engine's cancel checks ask: stop between steps."""
        return self.cancel_requested.is_set() or self.lost.is_set() or self.released.is_set()

    def check_before_recording(self) -> None:
        """Once the work is done: raises Cancelled for a cancel request or a lost job, not for a worker that is
        shutting down, which records what it finished (handing the job back would run it again from the start)."""
        if self.cancel_requested.is_set() or self.lost.is_set():
            raise Cancelled()

    def run(self) -> None:
        poll_s = min(1.0, self.interval_s)
        last_beat = last_success = time.monotonic()  # the claim itself was the first beat
        while not self._stop_event.wait(poll_s):
            beat = time.monotonic() - last_beat >= self.interval_s
            try:
                with session_scope() as session:
                    if beat:
                        last_beat = time.monotonic()
                        if not jobs.heartbeat(session, self.job_id, self.worker_id):
                            self.lost.set()
                    if jobs.cancel_requested(session, self.job_id):
                        self.cancel_requested.set()
                if beat:  # committed
                    last_success = time.monotonic()
                    if self.keep_fresh is not None:
                        self.keep_fresh()
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)
            if self.worker_stopping is not None and self.worker_stopping():
                self.released.set()
            if time.monotonic() - last_success >= self.give_up_after_s:
                log.error("job %s: no heartbeat reached the database for %.0f s; stopping, the reaper will "
                          "requeue it", self.job_id, time.monotonic() - last_success)
                self.lost.set()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class ProgressWriter:
    """Writes progress to the row, at most every PROGRESS_MIN_INTERVAL_S unless the stage changes."""

    def __init__(self, job_id: str, worker_id: str):
        self.job_id, self.worker_id = job_id, worker_id
        self._last_write = 0.0
        self._last_stage: str | None = None

    def __call__(self, progress: Progress) -> None:
        finished_stage = progress.total and progress.step >= progress.total
        if (progress.stage == self._last_stage and not finished_stage
                and time.monotonic() - self._last_write < PROGRESS_MIN_INTERVAL_S):
            return
        self._last_write, self._last_stage = time.monotonic(), progress.stage
        value = {"fraction": round(progress.fraction, 4), "stage": progress.stage, "step": progress.step,
                 "total": progress.total, "metrics": progress.metrics}
        try:
            with session_scope() as session:
                jobs.write_progress(session, self.job_id, self.worker_id, value)
        except SoftTimeLimitExceeded:  # raised on this thread by Celery: it must reach run_job, not the log
            raise
        except Exception:  # progress is advisory: a database outage must not fail the job (the next write retries)
            log.warning("job %s: progress not written", self.job_id, exc_info=True)
            self._last_stage = None


@dataclass
class _LoadedJob:
    kind: str
    method: str | None
    params: dict
    seed: int
    inputs: MergeInputs
    base_model_id: str
    owner: str
    checkpoint_paths: dict[str, Path]  # evaluations: the checkpoints they name, by id
    provenance: dict[str, str]  # written into the checkpoint's safetensors metadata (the model card's core)


def _load(session: Session, job_id: str) -> _LoadedJob:
    """The job's rows as engine inputs. Paths only: a remote store's blobs are fetched after the transaction
    (fetch_inputs), which must not stay open for a download."""
    blobs = get_blob_store()
    job = session.get(Job, job_id)
    base = session.get(BaseModel, job.base_model_id)
    rows = session.scalars(select(TaskVector).where(TaskVector.id.in_(job.task_vector_ids)))
    vectors = {tv.id: tv for tv in rows}
    dataset_ids = [i.dataset_id for i in job.inputs if i.dataset_id]
    datasets = session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids))).all()
    inputs = MergeInputs(
        base_path=blobs.local_path(base.sha256),
        base_spec=ModelSpec(architecture=base.architecture, config=base.config),
        task_vectors=[TaskVectorInput(tv_id, vectors[tv_id].name, blobs.local_path(vectors[tv_id].sha256),
                                      vectors[tv_id].class_names, vectors[tv_id].magnitude_cuts,
                                      vectors[tv_id].magnitude_means)
                      for tv_id in job.task_vector_ids],
        datasets={d.id: DatasetInput(d.id, d.name, blobs.local_path(d.sha256), d.class_names, d.templates)
                  for d in datasets},
    )
    start = None
    if job.start_checkpoint_id is not None:
        start = session.get(Checkpoint, job.start_checkpoint_id)
        if start is None:
            raise ValueError(f"checkpoint {job.start_checkpoint_id} was deleted after this job was queued")
        inputs = replace(inputs, start_path=blobs.local_path(start.sha256))
    checkpoint_paths = {}
    if job.kind == JobKind.EVALUATION:
        named = [job.params.get("checkpoint_id")]
        named += [item.get("reference_checkpoint_id") for item in job.params["datasets"]]
        rows = session.scalars(select(Checkpoint).where(Checkpoint.id.in_([i for i in named if i])))
        checkpoint_paths = {row.id: blobs.local_path(row.sha256) for row in rows}
        missing = sorted({i for i in named if i} - set(checkpoint_paths))
        if missing:
            raise ValueError(f"checkpoints {missing} were deleted after this evaluation was queued")
    provenance = checkpoint_provenance(job, base, [vectors[tv_id] for tv_id in job.task_vector_ids], datasets,
                                       start)
    return _LoadedJob(job.kind, job.method, job.params, job.seed, inputs, base.id, job.owner, checkpoint_paths,
                      provenance)


def checkpoint_provenance(job: Job, base: BaseModel, vectors: list[TaskVector], datasets: list[Dataset],
                          start: Checkpoint | None = None) -> dict:
    """What made the checkpoint, as safetensors metadata (JSON strings): the recipe, every input's sha256 (the
    start checkpoint's too, when chained) and the software. No job id or time: the same spec and seed must still
    give the same bytes."""
    recipe = {"method": job.method, "params": job.params, "seed": job.seed}
    inputs = {"base_model": {"name": base.name, "sha256": base.sha256, "architecture": base.architecture,
                             "config": base.config},
              "task_vectors": [{"name": tv.name, "sha256": tv.sha256, "kind": tv.source_kind} for tv in vectors],
              "datasets": [{"name": d.name, "sha256": d.sha256} for d in sorted(datasets, key=lambda d: d.id)]}
    if start is not None:
        inputs["start_checkpoint"] = {"sha256": start.sha256}
    return {"tvforge.recipe": json.dumps(recipe, sort_keys=True), "tvforge.inputs": json.dumps(inputs, sort_keys=True),
            "tvforge.software": json.dumps(software_versions(), sort_keys=True)}


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("tvforge", "torch", "open_clip_torch", "safetensors", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _evaluate(loaded: _LoadedJob, ctx: JobContext, memory_bytes: int) -> dict:
    """An evaluation job's spec (app.schemas.EvaluationCreate, as stored) turned into engine inputs."""
    paths = loaded.checkpoint_paths
    items = [EvaluationItem(item["dataset_id"], paths.get(item.get("reference_checkpoint_id")),
                            item.get("reference_task_vector_id"), item.get("split"))
             for item in loaded.params["datasets"]]
    refuse_if_too_large(estimate_evaluation(loaded.inputs, items, resident_bytes()), ctx.device, memory_bytes)
    return evaluate(loaded.inputs, paths.get(loaded.params.get("checkpoint_id")), items, ctx)


def fetch_inputs(loaded: _LoadedJob, blobs) -> None:
    """Every blob the job reads, present on this machine (a remote store's cache fetches what it lacks)."""
    for path in input_paths(loaded):
        blobs.path(blobs.digest_at(path))


def input_paths(loaded: _LoadedJob) -> list[Path]:
    """Every blob the job reads: a remote store's cache must not prune them while it runs."""
    inputs = loaded.inputs
    return [inputs.base_path, *(tv.path for tv in inputs.task_vectors), *(d.path for d in inputs.datasets.values()),
            *([inputs.start_path] if inputs.start_path else []), *loaded.checkpoint_paths.values()]


def job_vector_ids(loaded: _LoadedJob) -> list[str]:
    return [tv.id for tv in loaded.inputs.task_vectors]


class TooLargeForWorker(Exception):
    pass


def usable_memory_bytes(device: str) -> int:
    """Memory this process could hold at a job's peak on the device it runs on. The GPU's free memory and what
    torch's caching allocator holds there for this process (CUDA counts that as used; it is this process's to
    reuse). On the CPU the machine's MemAvailable and this process's own resident memory, which the estimate
    counts as its runtime and MemAvailable leaves out (it was counted twice: a worker with 19.3 GiB available
    refused a job that needed 18.8 GiB besides its 3 GiB)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] + torch.cuda.memory_reserved(torch.device(device))
    return available_memory_bytes() + resident_bytes()


def available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # not Linux: nothing to compare with


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def refuse_if_too_large(estimate: JobEstimate, device: str, memory_bytes: int) -> None:
    """A job the engine estimates (engine.cost) to need more memory than the device has free (or than
    TVFORGE_WORKER_MEMORY_BYTES gives this worker) is refused with the numbers, instead of being killed
    half-way by the kernel or CUDA. The estimate is given the worker's own resident size for the runtime."""
    free = min(usable_memory_bytes(device), memory_bytes)
    if estimate.peak_bytes > free:
        raise TooLargeForWorker(f"this job needs about {estimate.peak_bytes / 2**30:.1f} GiB and the worker's "
                                f"{device} has {free / 2**30:.1f} GiB for it: a smaller batch_size or fewer task "
                                f"vectors, or a larger worker")


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cancelled_at_the_end(job_id: str, worker_id: str, retry_for_s: float) -> JobStatus | None:
    """After a success that was not recorded: CANCELLED if the owner's cancel came after the last step (the job is
    still this worker's: jobs.succeed refused it for the cancel), else None (the job is no longer this worker's)."""
    if transact(lambda session: jobs.acknowledge_cancel(session, job_id, worker_id), retry_for_s):
        log.info("job %s cancelled after its last step; its result is dropped", job_id)
        return JobStatus.CANCELLED
    return None


def run_job(job_id: str, worker_id: str, worker_stopping: Callable[[], bool] | None = None) -> JobStatus | None:
    """Run a job end to end; returns its final status, or None if this worker did not claim it or gave it up.

    worker_stopping: true once the worker process is shutting down (worker.tasks): the job stops between steps
    and goes back to the queue for another worker, its attempt not counted."""
    settings = get_settings()
    if not claim(job_id, worker_id, settings):
        log.info("job %s not claimed by %s", job_id, worker_id)
        return None
    blobs = get_blob_store()
    retry_for_s = through_outages(settings)
    loaded: _LoadedJob | None = None

    def keep_inputs_cached() -> None:
        if loaded is not None:
            blobs.keep_fresh(input_paths(loaded))

    heartbeat = Heartbeat(job_id, worker_id, settings.heartbeat_interval_s, settings.heartbeat_timeout_s,
                          keep_fresh=keep_inputs_cached, worker_stopping=worker_stopping)
    heartbeat.start()
    log.info("job claimed by %s", worker_id)
    workdir: Path | None = None
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=blobs.tmp_dir))
        loaded = transact(lambda session: _load(session, job_id), retry_for_s)
        through_storage_outages(lambda: fetch_inputs(loaded, blobs), retry_for_s)
        ctx = JobContext(
            workdir=workdir, cache_dir=settings.head_cache_dir,
            device=resolve_device(settings.device), seed=loaded.seed, report=ProgressWriter(job_id, worker_id),
            is_cancelled=heartbeat.stop_requested,
            # No job id here: the same spec and seed must give the same bytes.
            metadata={"format": "pt", "tvforge.method": str(loaded.method), **loaded.provenance},
        )
        if loaded.kind == JobKind.EVALUATION:
            report = _evaluate(loaded, ctx, settings.worker_memory_bytes)
            heartbeat.check_before_recording()
            ok = transact(lambda session: jobs.succeed(session, job_id, worker_id,
                                                       result={"metrics": {"evaluation": report}}), retry_for_s)
            return JobStatus.SUCCEEDED if ok else _cancelled_at_the_end(job_id, worker_id, retry_for_s)
        spec = get_method(loaded.method)
        params = spec.params.model_validate(loaded.params)
        refuse_if_too_large(estimate_inputs(spec, loaded.inputs, params, resident_bytes()), ctx.device,
                            settings.worker_memory_bytes)
        result = run_method(spec, loaded.inputs, params, ctx)
        heartbeat.check_before_recording()
        header = read_header(result.checkpoint_path)
        committed = through_storage_outages(
            lambda: blobs.commit_file(result.checkpoint_path, result.checkpoint_sha256), retry_for_s)
        checkpoint = Checkpoint(id=new_id("ckpt"), owner=loaded.owner, job_id=job_id, sha256=committed.sha256,
                                size_bytes=committed.size,
                                format="safetensors", contents={
                                    "kind": "merged_state_dict", "base_model_id": loaded.base_model_id,
                                    "method": loaded.method, "task_vectors": job_vector_ids(loaded),
                                    "tensor_count": len(header.tensors), "parameter_count": header.parameter_count,
                                    "device": ctx.device})
        ok = transact(lambda session: jobs.succeed(session, job_id, worker_id,
                                                   result={"checkpoint_id": checkpoint.id, "metrics": result.metrics},
                                                   artifacts=result.artifacts or None, checkpoint=checkpoint),
                      retry_for_s)
        if not ok:
            log.warning("job %s: checkpoint %s not recorded (cancelled, or no longer this worker's)", job_id,
                        checkpoint.id)
            return _cancelled_at_the_end(job_id, worker_id, retry_for_s)
        log.info("job succeeded: checkpoint %s (%d bytes)", checkpoint.id, committed.size)
        return JobStatus.SUCCEEDED
    except Cancelled:
        if heartbeat.lost.is_set():
            log.warning("job %s was taken from worker %s; stopping", job_id, worker_id)
            return None
        if heartbeat.released.is_set() and not heartbeat.cancel_requested.is_set():
            if transact(lambda session: jobs.release(session, job_id, worker_id), retry_for_s):
                log.info("job %s handed back to the queue: this worker is shutting down", job_id)
                publish(job_id)
            return None
        transact(lambda session: jobs.acknowledge_cancel(session, job_id, worker_id), retry_for_s)
        return JobStatus.CANCELLED
    except Exception as exc:
        if is_transient(exc):
            # The database stayed out past through_outages: the job is not at fault, and a failure written once
            # it is back would replace work that may be done. The reaper re-queues the job.
            log.error("job %s: the database is unreachable; left to the reaper", job_id)
            raise
        if isinstance(exc, SoftTimeLimitExceeded):
            error = jobs.time_limit_passed(settings.job_time_limit_s)
        elif isinstance(exc, TooLargeForWorker):
            error = jobs.problem("Too large for this worker", str(exc), "too-large-for-worker")
        else:
            log.exception("job %s failed", job_id)
            error = jobs.problem("Job failed", f"{type(exc).__name__}: {exc}", "job-failed")
        transact(lambda session: jobs.fail(session, job_id, worker_id, error=error), retry_for_s)
        return JobStatus.FAILED
    finally:
        heartbeat.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
