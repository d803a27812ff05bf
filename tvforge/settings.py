"""Settings, read from the environment with the TVFORGE_ prefix.

The same code runs embedded (SQLite, local blob store, a private redis-server)
and in production (PostgreSQL, a shared Redis); only these settings differ.
"""
from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OwnerQuota(BaseModel):
    storage_bytes: int | None = Field(None, ge=0)
    active_jobs: int | None = Field(None, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TVFORGE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root for the embedded database and blob store.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/tvforge.db.")
    blob_dir: Path | None = Field(None, description="Content-addressed blob store; default <data_dir>/blobs.")
    blob_s3_url: str | None = Field(None, description="s3://bucket/prefix: keep blobs on an S3-compatible server "
                                    "shared by every machine (blob_dir is then each machine's cache). Unset: the "
                                    "local store in blob_dir.")
    blob_s3_endpoint_url: str | None = Field(None, description="The S3 server's URL when it is not AWS (MinIO: "
                                             "http://minio:9000). Credentials come from AWS_ACCESS_KEY_ID and "
                                             "AWS_SECRET_ACCESS_KEY.")
    blob_cache_max_bytes: int | None = Field(50 * 1024**3, ge=0, description="With blob_s3_url: the most bytes "
                                             "of blobs a machine keeps cached; the least recently used copies "
                                             "past it are dropped (they stay in the bucket).")
    broker_url: str = Field("redis://127.0.0.1:6390/0", description="Celery broker (Redis).")
    max_upload_bytes: int = Field(8 * 1024**3, description="Largest accepted upload; larger ones get 413.")
    max_model_parameters: int = Field(4_000_000_000, description="Largest base model accepted, in parameters.")
    max_dataset_images: int = Field(200_000, description="Most images a dataset may hold.")
    max_dataset_unpacked_bytes: int = Field(4 * 1024**3, description="Most bytes a dataset zip may unpack to.")
    max_dataset_decoded_bytes: int = Field(4 * 1024**3, description="Most bytes a dataset's images may decode "
                                                                    "to (N x H x W x 3), checked before decoding.")
    max_dataset_classes: int = Field(10_000, description="Most classes a dataset may have (labels below it).")
    max_dataset_source_pixels: int = Field(20_000_000_000, description="Most pixels a zip's images may hold as "
                                                                       "stored, before resizing (the decoding work).")
    dataset_image_size: int = Field(224, description="Side to which zip images of mixed sizes are resized.")
    job_time_limit_s: int = Field(6 * 3600, description="Hard time limit of one job attempt.")
    heartbeat_interval_s: float = Field(5.0, description="How often a running job's worker touches its row.")
    heartbeat_timeout_s: float = Field(60.0, description="A running job silent this long is taken as lost.")
    reaper_interval_s: float = Field(10.0, description="How often workers look for lost jobs.")
    blob_gc_interval_s: float = Field(600.0, description="How often workers remove blobs no row references.")
    blob_gc_grace_s: float = Field(3600.0, description="An unreferenced blob is kept this long after its last "
                                                     "commit (an upload of the same bytes may be about to use it).")
    republish_after_s: float = Field(300.0, description="A queued job no worker claimed this long after it was "
                                                       "published is published again (a broker may lose messages).")
    max_attempts: int = Field(3, description="Attempts before a job whose workers keep dying is failed.")
    device: str = Field("auto", description="Worker device: auto (CUDA when present), cpu or cuda.")
    torch_threads: int = Field(0, ge=0, description="CPU threads a job's torch ops use; 0: torch's default (a "
                                                    "thread per core) divided by the worker's concurrency.")
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8000, description="Port the API binds to.")
    max_job_images: int = Field(2_000_000, ge=1, description="A job may push at most this many images through "
                                                               "the model (training and evaluation); more: 422.")
    worker_memory_bytes: int = Field(16 * 1024**3, ge=1, description="Memory of a worker: a job estimated to need "
                                                                      "more is refused (422).")
    db_pool_size: int = Field(40, ge=1, le=1000, description="Pooled database connections per process (the API's "
                                                             "threadpool has 40 threads).")
    log_format: str = Field("json", pattern="^(json|text)$", description="json: one JSON object per log line, "
                                                                         "with its request_id or job_id; text: "
                                                                         "plain lines.")
    rate_limit: str = Field("100/second;3000/minute", description="Requests each owner may make, as `limits` "
                                                                "strings separated by ';' (empty: no limit).")
    rate_limit_storage: str = Field("memory://", description="Where rate-limit counters live: memory:// (one API "
                                                              "process) or a redis:// URL shared by all of them.")
    header_timeout_s: float = Field(10.0, gt=0, description="A request's headers must arrive within this; slower "
                                                            "connections are closed.")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="A request body that stops arriving for this long "
                                                               "gets 408 (its partial upload is dropped).")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Idle keep-alive connections close after this.")
    max_connections: int = Field(1000, ge=1, description="Open connections past this get 503.")
    max_long_requests_per_owner: int = Field(16, ge=1, description="Uploads, downloads and event streams one "
                                             "owner may have open on one API process at once; past it, 429 "
                                             "with Retry-After.")
    graceful_shutdown_s: float = Field(30.0, ge=0, description="On SIGTERM, requests in flight get this long to "
                                                               "finish.")

    quota_storage_bytes: int | None = Field(None, ge=0, description="Bytes each owner may store: its base models, "
                                        "task vectors, datasets and checkpoints (a blob two rows share counts "
                                        "twice). Past it, uploads and merge jobs get 403. Unset: no quota.")
    quota_active_jobs: int | None = Field(None, ge=0, description="Jobs each owner may have queued or running at "
                                          "once; past it, a new job gets 429 with Retry-After. Unset: no quota.")
    quota_overrides: dict[str, OwnerQuota] = Field({}, description='Quotas of particular owners, replacing the '
                                                   'defaults field by field, as JSON: {"alice": {"storage_bytes": '
                                                   '1000000000, "active_jobs": 8}}.')

    head_cache_max_bytes: int = Field(1024**3, description="Zero-shot heads cached on disk, least recently used "
                                                          "pruned past this size.")

    @property
    def head_cache_dir(self) -> Path:
        """Zero-shot heads shared by the jobs (a cache: anything in it may be removed)."""
        return self.resolved_blob_dir.parent / "cache"

    @cached_property  # read by every request's session: resolving the path is a few syscalls each time
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'tvforge.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
