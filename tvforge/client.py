"""The Python SDK of the HTTP API (docs/api.md); the CLI, the demo and the tests use it. It talks HTTP only.

- Responses are typed (TypedDicts: the JSON as received, with its shape declared for editors and type
  checkers; tests check the declarations against the live OpenAPI document).
- Connection errors and 5xx answers are retried with backoff (tenacity), honouring Retry-After. A job is
  submitted with one Idempotency-Key for all its attempts, so a retry never runs it twice; an upload is
  retried only after asking the server whether the lost attempt landed (by the file's sha256 and name).
- Uploads and downloads stream in chunks with an optional progress callback; a download resumes an
  interrupted `.part` file with Range + If-Range and checks the sha256 before renaming it into place.
"""
import hashlib
import json
import os
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NotRequired, TypedDict

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_result, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

FINISHED = ("succeeded", "failed", "cancelled")
# 429 (a rate limit, the active-jobs quota) changed nothing and says when to come back (Retry-After).
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
CHUNK_BYTES = 1024 * 1024
EVENTS_SILENCE_S = 60.0  # four of the server's keep-alive intervals (app.routes.jobs.SSE_KEEPALIVE_S)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class BaseModelInfo(TypedDict):
    id: str
    name: str
    architecture: str | None
    config: dict | None
    pretrained: str | None
    sha256: str
    size_bytes: int
    tensor_count: int
    parameter_count: int
    visual_parameter_count: int
    text_parameter_count: int
    created_at: str


class TaskVectorInfo(TypedDict):
    id: str
    base_model_id: str
    name: str
    source_kind: Literal["task_vector", "finetuned"]
    sha256: str
    source_sha256: str | None  # the uploaded file's (the fine-tuned weights for kind finetuned)
    size_bytes: int
    tensor_count: int
    parameter_count: int
    l2_norm: float
    lora_rank: int | None  # the largest rank of its LoRA factors; None for a dense vector
    class_names: list[str] | None
    created_at: str


class DatasetInfo(TypedDict):
    id: str
    name: str
    source_format: str
    source_sha256: str
    sha256: str
    size_bytes: int
    labeled: bool
    class_names: list[str] | None
    templates: list[str] | None
    splits: dict[str, Any]
    image_shape: list[int]
    created_at: str


class JobProgress(TypedDict):
    fraction: float
    stage: str | None
    step: int
    total: int
    metrics: dict[str, Any]


class JobInfo(TypedDict):
    id: str
    kind: Literal["merge", "evaluation"]
    method: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    base_model_id: str
    task_vectors: list[str]
    start_checkpoint_id: str | None  # chaining: the checkpoint the merge started from
    params: dict[str, Any]
    seed: int
    progress: JobProgress
    result: dict[str, Any] | None  # result["checkpoint_id"], result["metrics"] once succeeded
    error: dict[str, Any] | None
    attempts: int
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None


class CheckpointInfo(TypedDict):
    id: str
    job_id: str
    sha256: str
    size_bytes: int
    format: str
    contents: dict[str, Any]
    created_at: str


class CoefficientsInfo(TypedDict):
    job_id: str
    task_vectors: list[str]
    blocks: list[str]
    values: list[list[float]]
    granularity: str
    start_checkpoint_id: NotRequired[str | None]  # chaining: the checkpoint they compose onto
    extra: NotRequired[dict[str, Any]]


class LearningCurveInfo(TypedDict):
    job_id: str
    epochs: list[dict[str, Any]]  # epoch 0 is before training: loss, accuracy per selection dataset, split


class DryRunInfo(TypedDict):
    valid: bool
    method: str
    estimate: dict[str, Any]  # images, composition_images, peak_bytes, peak_gib (engine/cost.py)
    limits: dict[str, Any]  # the service's bounds it was checked against


class MethodInfo(TypedDict):
    name: str
    summary: str
    reference: str
    params_schema: dict[str, Any]
    result_keys: dict[str, str]


class ApiError(Exception):
    """A 4xx or 5xx answer; `problem` is its RFC 9457 body."""

    def __init__(self, status: int, problem: dict[str, Any]):
        super().__init__(f"{status}: {problem.get('title')}: {problem.get('detail')}")
        self.status = status
        self.problem = problem


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str


def load_config(url: str | None = None, api_key: str | None = None, path: Path | None = None) -> ClientConfig:
    """Server and key: the arguments, else TVFORGE_URL / TVFORGE_API_KEY, else the config file
    (TVFORGE_CONFIG, default ~/.config/tvforge/config.toml: `url = "..."`, `api_key = "..."`); with no URL
    anywhere, the embedded service's (TVFORGE_API_HOST / TVFORGE_API_PORT). With no key anywhere, the admin key
    `tvforge up` wrote under its data dir, for the embedded service only: another server never gets it."""
    url = url or os.environ.get("TVFORGE_URL")
    api_key = api_key or os.environ.get("TVFORGE_API_KEY")
    if url is None or api_key is None:
        path = path or Path(os.environ.get("TVFORGE_CONFIG", Path.home() / ".config" / "tvforge" / "config.toml"))
        if path.is_file():
            stored = tomllib.loads(path.read_text())
            url, api_key = url or stored.get("url"), api_key or stored.get("api_key")
    if api_key is None and (url is None or is_embedded(url)):
        api_key = embedded_admin_key()
    if api_key is None:
        raise ValueError("no API key: pass one, set TVFORGE_API_KEY, or write api_key in the config file")
    return ClientConfig(url or embedded_url(), api_key)


def is_embedded(url: str) -> bool:
    """Whether url names this machine's embedded service: a loopback address (or its bind address) and its port."""
    from tvforge.settings import get_settings

    settings = get_settings()
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:  # not a URL at all: certainly not the embedded service's (httpx says why later)
        return False
    return parsed.host in {"127.0.0.1", "localhost", "::1", settings.api_host} and parsed.port == settings.api_port


def embedded_admin_key() -> str | None:
    """The key `tvforge up` made for its admin (<TVFORGE_DATA_DIR>/admin.key), if there is one."""
    from tvforge.settings import get_settings

    key_file = get_settings().data_dir / "admin.key"
    return key_file.read_text().strip() if key_file.is_file() else None


def embedded_url() -> str:
    """The API the embedded service (`tvforge up`) serves: its configured host and port."""
    from tvforge.settings import get_settings

    settings = get_settings()
    return f"http://{settings.api_host}:{settings.api_port}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _ProgressReader:
    """A file that reports how much of it was read; httpx streams multipart files through read()."""

    def __init__(self, file: IO[bytes], total: int, progress: Progress):
        self._file, self._total, self._progress, self._done = file, total, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._done += len(chunk)
        self._progress(self._done, self._total)
        return chunk

    # httpx sizes the body (Content-Length instead of chunked) from these.
    def fileno(self) -> int:
        return self._file.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def _retry_wait(backoff: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            retry_after = outcome.result().headers.get("retry-after", "")
            if retry_after.isdigit():
                return min(float(retry_after), 30.0)
        return backoff(state)
    return wait


class TvforgeClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 120.0, retries: int = 5,
                 backoff_s: float = 0.25):
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=timeout)
        self.retries = retries
        self._wait = _retry_wait(wait_exponential_jitter(multiplier=backoff_s, max=10.0))

    @classmethod
    def from_config(cls, url: str | None = None, api_key: str | None = None, **kwargs) -> "TvforgeClient":
        config = load_config(url, api_key)
        return cls(config.url, config.api_key, **kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "TvforgeClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------------

    def _retrying(self) -> Retrying:
        return Retrying(stop=stop_after_attempt(self.retries), wait=self._wait, reraise=True,
                        retry=retry_if_exception_type(httpx.TransportError)
                        | retry_if_result(lambda r: r.status_code in RETRIED_STATUSES),
                        retry_error_callback=lambda state: state.outcome.result())

    def _send(self, send: Callable[[], httpx.Response],
              landed: Callable[[], httpx.Response | None] | None = None) -> httpx.Response:
        """send(), retried on connection errors, 429 and 5xx. Before a retry, landed() may answer instead: for a
        request that is not idempotent, it asks the server whether the failed attempt took effect."""
        for attempt in self._retrying():
            with attempt:
                found = landed() if landed is not None and attempt.retry_state.attempt_number > 1 else None
                response = found if found is not None else send()
            if not attempt.retry_state.outcome.failed:
                attempt.retry_state.set_result(response)
        return response

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self._send(lambda: self.http.request(method, path, **kwargs))

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text}
            raise ApiError(response.status_code, problem)
        return response.json() if response.content else None

    def get(self, path: str, **params) -> Any:
        return self._json(self.request("GET", path, params={k: v for k, v in params.items() if v is not None}))

    def delete(self, path: str) -> None:
        self._json(self.request("DELETE", path))

    def iterate(self, path: str, **params) -> Iterator[dict]:
        """Every item of a paged list."""
        cursor = None
        while True:
            page = self.get(path, **params, cursor=cursor, limit=200)
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    # -- uploads ------------------------------------------------------------------------------------------

    def _upload(self, path: str, file: Path, fields: dict[str, Any],
                find_existing: Callable[[], dict | None] | None, progress: Progress | None) -> dict:
        data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}
        size = Path(file).stat().st_size

        def landed() -> httpx.Response | None:
            existing = find_existing()
            return httpx.Response(201, json=existing) if existing is not None else None

        with open(file, "rb") as f:
            def send() -> httpx.Response:
                f.seek(0)
                body = _ProgressReader(f, size, progress) if progress else f
                return self.http.post(path, data=data, files={"file": (Path(file).name, body)})

            return self._json(self._send(send, landed if find_existing else None))

    def find_base_model(self, sha256: str, name: str | None = None) -> BaseModelInfo | None:
        """The caller's base model uploaded from a file with this sha256 (and name), if any."""
        return next((m for m in self.iterate("/v1/base-models", sha256=sha256)
                     if name is None or m["name"] == name), None)

    def find_equivalent_base_model(self, sha256: str, architecture: str | None, config: dict | None,
                                   name: str) -> BaseModelInfo | None:
        """A base model of these bytes and this architecture or config, under any name (the one named so first):
        registering the same weights again under another name would upload them again."""
        same = [m for m in self.iterate("/v1/base-models", sha256=sha256)
                if m["architecture"] == architecture and m["config"] == config]
        return _named_first(same, name)

    def find_task_vector(self, base_model_id: str, source_sha256: str, name: str | None = None,
                         kind: str | None = None) -> TaskVectorInfo | None:
        """The caller's task vector of this base uploaded from a file with this sha256 (a task vector's, or the
        fine-tuned weights it was made from), and name and kind, if any."""
        return next((v for v in self.iterate("/v1/task-vectors", base_model_id=base_model_id,
                                             source_sha256=source_sha256)
                     if (name is None or v["name"] == name) and (kind is None or v["source_kind"] == kind)), None)

    def find_equivalent_task_vector(self, base_model_id: str, source_sha256: str, kind: str,
                                    class_names: list[str] | None, name: str) -> TaskVectorInfo | None:
        """A task vector of this base from a file with this sha256, of this kind and with these class names,
        under any name (the one named so first)."""
        same = [v for v in self.iterate("/v1/task-vectors", base_model_id=base_model_id, source_sha256=source_sha256)
                if v["source_kind"] == kind and v["class_names"] == class_names]
        return _named_first(same, name)

    def find_dataset(self, source_sha256: str, name: str | None = None) -> DatasetInfo | None:
        return next((d for d in self.iterate("/v1/datasets", source_sha256=source_sha256)
                     if name is None or d["name"] == name), None)

    def find_equivalent_dataset(self, source_sha256: str, class_names: list[str] | None, templates: list[str] | None,
                                name: str) -> DatasetInfo | None:
        """A dataset from a file with this sha256 with these zero-shot templates (None: the service's) and class
        names (None: any, as a folder zip names its own), under any name (the one named so first): a dataset of
        the same bytes but other prompts gives other zero-shot heads, and is not the same."""
        same = [d for d in self.iterate("/v1/datasets", source_sha256=source_sha256)
                if d["templates"] == templates and (class_names is None or d["class_names"] == class_names)]
        return _named_first(same, name)

    def register_base_model(self, name: str, file: Path, architecture: str | None = None,
                            config: dict | None = None, progress: Progress | None = None) -> BaseModelInfo:
        sha = file_sha256(file)
        return self._upload("/v1/base-models", file, {"name": name, "architecture": architecture, "config": config},
                            lambda: self.find_base_model(sha, name), progress)

    def upload_task_vector(self, base_model_id: str, name: str, file: Path, kind: str = "task_vector",
                           class_names: list[str] | None = None, progress: Progress | None = None) -> TaskVectorInfo:
        # The server records the uploaded file's sha256 (a fine-tuned checkpoint's too): a retry after a lost
        # answer asks whether the attempt landed.
        sha = file_sha256(file)
        return self._upload("/v1/task-vectors", file, {"base_model_id": base_model_id, "name": name,
                                                       "kind": kind, "class_names": class_names},
                            lambda: self.find_task_vector(base_model_id, sha, name, kind), progress)

    def upload_dataset(self, name: str, file: Path, class_names: list[str] | None = None,
                       templates: list[str] | None = None, progress: Progress | None = None) -> DatasetInfo:
        sha = file_sha256(file)
        return self._upload("/v1/datasets", file, {"name": name, "class_names": class_names, "templates": templates},
                            lambda: self.find_dataset(sha, name), progress)

    # -- jobs ---------------------------------------------------------------------------------------------

    def _submit(self, path: str, body: dict, idempotency_key: str | None) -> JobInfo:
        # One key for every attempt: the server answers a repeat with the job the first attempt made.
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._json(self.request("POST", path, json=body, headers=headers))

    @staticmethod
    def _job_body(method: str, base_model_id: str, task_vectors: list[str], params: dict | None, seed: int,
                  start_checkpoint_id: str | None) -> dict:
        body = {"method": method, "base_model_id": base_model_id, "task_vectors": task_vectors,
                "params": params or {}, "seed": seed}
        if start_checkpoint_id is not None:
            body["start_checkpoint_id"] = start_checkpoint_id
        return body

    def create_job(self, method: str, base_model_id: str, task_vectors: list[str], params: dict | None = None,
                   seed: int = 0, idempotency_key: str | None = None,
                   start_checkpoint_id: str | None = None) -> JobInfo:
        """start_checkpoint_id: merge onto an earlier job's checkpoint instead of theta_0 (chaining)."""
        return self._submit("/v1/jobs", self._job_body(method, base_model_id, task_vectors, params, seed,
                                                       start_checkpoint_id), idempotency_key)

    def estimate_job(self, method: str, base_model_id: str, task_vectors: list[str], params: dict | None = None,
                     seed: int = 0, start_checkpoint_id: str | None = None) -> DryRunInfo:
        """The job validated and costed as create_job would submit it (?dry_run=true): nothing is queued; a job
        that would be refused raises the same ApiError."""
        body = self._job_body(method, base_model_id, task_vectors, params, seed, start_checkpoint_id)
        return self._json(self.request("POST", "/v1/jobs", json=body, params={"dry_run": "true"}))

    def list_jobs(self, status: str | None = None, kind: str | None = None) -> Iterator[JobInfo]:
        """The caller's jobs, oldest first (ids are time-ordered), optionally of one status (queued, running, ...)
        or kind."""
        filters = {name: value for name, value in (("status", status), ("kind", kind)) if value is not None}
        return self.iterate("/v1/jobs", **filters)

    def list_checkpoints(self, job_id: str | None = None) -> Iterator[CheckpointInfo]:
        """The caller's checkpoints, oldest first, optionally the one a job made."""
        return self.iterate("/v1/checkpoints", **({"job_id": job_id} if job_id else {}))

    def methods(self) -> list[MethodInfo]:
        """The method catalogue: each method's params schema (with defaults) and the metrics it reports."""
        return self.get("/v1/methods")

    def create_evaluation(self, datasets: list[dict], checkpoint_id: str | None = None,
                          base_model_id: str | None = None, idempotency_key: str | None = None) -> JobInfo:
        """datasets: [{"dataset_id", optional "reference_checkpoint_id" or "reference_task_vector_id", "split"}]."""
        body = {"datasets": datasets, **({"checkpoint_id": checkpoint_id} if checkpoint_id else {}),
                **({"base_model_id": base_model_id} if base_model_id else {})}
        return self._submit("/v1/evaluations", body, idempotency_key)

    def get_job(self, job_id: str) -> JobInfo:
        return self.get(f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> JobInfo:
        return self._json(self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def coefficients(self, job_id: str) -> CoefficientsInfo:
        return self.get(f"/v1/jobs/{job_id}/coefficients")

    def learning_curve(self, job_id: str) -> LearningCurveInfo:
        """An aTLAS job's loss and selection accuracy per epoch."""
        return self.get(f"/v1/jobs/{job_id}/learning-curve")

    def wait_for_job(self, job_id: str, timeout_s: float = 600, poll_s: float = 0.25) -> JobInfo:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job["status"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def events(self, job_id: str) -> Iterator[tuple[str, JobInfo]]:
        """Server-Sent Events of a job, as (event, job) pairs, until it ends. The server writes at least every
        15 s (a keep-alive comment): a stream silent for EVENTS_SILENCE_S is taken as lost (httpx.ReadTimeout),
        not waited on forever."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=EVENTS_SILENCE_S)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    yield event, json.loads(line.removeprefix("data:"))

    # -- downloads ----------------------------------------------------------------------------------------

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointInfo:
        return self.get(f"/v1/checkpoints/{checkpoint_id}")

    def checkpoint_card(self, checkpoint_id: str, markdown: bool = False) -> dict | str:
        """The checkpoint's model card: a dict, or its markdown text."""
        if markdown:
            response = self.request("GET", f"/v1/checkpoints/{checkpoint_id}/card", params={"format": "markdown"})
            if response.status_code >= 400:
                self._json(response)  # raises ApiError with the problem
            return response.text
        return self.get(f"/v1/checkpoints/{checkpoint_id}/card")

    def download_checkpoint(self, checkpoint_id: str, dest: str | os.PathLike,
                            progress: Progress | None = None) -> Path:
        """The checkpoint's file at dest (a directory, or a string ending in /: <checkpoint id>.safetensors in it),
        resuming dest.part if an earlier download was cut off; missing parent directories are created. Returns the
        file's path."""
        meta = self.get_checkpoint(checkpoint_id)
        return self._download(f"/v1/checkpoints/{checkpoint_id}/download", meta["sha256"], meta["size_bytes"],
                              _file_in(dest, checkpoint_id), progress)

    def download_task_vector(self, task_vector_id: str, dest: str | os.PathLike,
                             progress: Progress | None = None) -> Path:
        """As download_checkpoint, for a stored task vector."""
        meta = self.get(f"/v1/task-vectors/{task_vector_id}")
        return self._download(f"/v1/task-vectors/{task_vector_id}/download", meta["sha256"], meta["size_bytes"],
                              _file_in(dest, task_vector_id), progress)

    def _download(self, path: str, sha256: str, size: int, dest: Path, progress: Progress | None) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        for attempt in Retrying(stop=stop_after_attempt(self.retries), wait=self._wait, reraise=True,
                                retry=retry_if_exception_type((httpx.TransportError, _RetriedStatus))):
            with attempt:
                self._fetch_into(path, f'"{sha256}"', size, part, progress)
        digest = file_sha256(part)
        if digest != sha256:
            part.unlink()
            raise ApiError(0, {"title": "Corrupt download", "detail": f"{path}: sha256 {digest}, expected {sha256}"})
        part.replace(dest)
        return dest

    def _fetch_into(self, path: str, etag: str, size: int, part: Path, progress: Progress | None) -> None:
        done = part.stat().st_size if part.exists() else 0
        if done > size:
            part.unlink()
            done = 0
        if done == size:
            return
        # If-Range: the rest of this very file (206), else the whole file again (200).
        headers = {"Range": f"bytes={done}-", "If-Range": etag} if done else {}
        with self.http.stream("GET", path, headers=headers) as response:
            if response.status_code in RETRIED_STATUSES:
                raise _RetriedStatus(response.status_code)
            if response.status_code >= 400:
                response.read()
                self._json(response)
            mode = "ab" if response.status_code == 206 else "wb"
            done = done if mode == "ab" else 0
            with open(part, mode) as f:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, size)


def _named_first(rows: list, name: str):
    """The row called name, else the first (the equivalent file registered first under another name), else None."""
    return next((row for row in rows if row["name"] == name), rows[0] if rows else None)


def _file_in(dest: str | os.PathLike, resource_id: str) -> Path:
    """dest, or <resource id>.safetensors inside it when it is a directory or is written as one, with a trailing
    slash (which pathlib drops; the directory is created): `download ID new/` wrote a file named `new`."""
    path = Path(dest)
    written_as_directory = isinstance(dest, str) and dest.endswith(("/", os.sep))
    return path / f"{resource_id}.safetensors" if path.is_dir() or written_as_directory else path


class _RetriedStatus(Exception):
    """A 5xx during a download: retried, resuming from what arrived."""
