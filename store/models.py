"""SQLAlchemy models. The job row is the source of truth for a job's state (store.jobs changes it)."""
import math
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.functions import FunctionElement


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC, returns aware UTC (SQLite keeps no time zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=UTC)


class database_utcnow(FunctionElement):  # lower case, as SQL's own functions
    """The database server's clock in UTC, for the job times that hosts compare (heartbeats, queueing, publishing):
    with each host's own clock, a worker whose clock ran a minute behind the reaper's had its live jobs re-queued."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(database_utcnow)
def _utcnow(element, compiler, **kw) -> str:  # printed statements; the service runs on the two below
    return "CURRENT_TIMESTAMP"


@compiles(database_utcnow, "postgresql")
def _postgresql_utcnow(element, compiler, **kw) -> str:
    return "timezone('utc', statement_timestamp())"


@compiles(database_utcnow, "sqlite")
def _sqlite_utcnow(element, compiler, **kw) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"  # the stored format (SQLAlchemy's), to the millisecond


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(StrEnum):
    MERGE = "merge"  # a composition method writes a checkpoint
    EVALUATION = "evaluation"  # existing weights measured on datasets; no checkpoint


class JobStatusType(TypeDecorator):
    """A job status stored as its plain string value (drivers need not know the enum)."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value, dialect):
        return None if value is None else JobStatus(value)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class BaseModel(Base):
    __tablename__ = "base_models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict | None] = mapped_column(JSON)
    pretrained: Mapped[str | None] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    tensor_count: Mapped[int] = mapped_column(Integer)
    parameter_count: Mapped[int] = mapped_column(Integer)
    visual_parameter_count: Mapped[int] = mapped_column(Integer)
    text_parameter_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TaskVector(Base):
    __tablename__ = "task_vectors"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source_kind: Mapped[str] = mapped_column(String(20))
    sha256: Mapped[str] = mapped_column(String(64))
    # the uploaded file's (a fine-tuned checkpoint's, for kind finetuned); None: finetuned, before migration 0010
    source_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    tensor_count: Mapped[int] = mapped_column(Integer)
    parameter_count: Mapped[int] = mapped_column(Integer)
    l2_norm: Mapped[float] = mapped_column(Float)
    # TIES's global cut for top_k = 1, 2, ..., 100 percent (engine.selection.PERCENTS), measured at upload;
    # None for rows older than migration 0006 (a merge then measures them)
    magnitude_cuts: Mapped[list | None] = mapped_column(JSON)
    # mean |tau| per tensor name (engine.selection.mean_magnitude), measured at upload; None before migration 0009
    magnitude_means: Mapped[dict | None] = mapped_column(JSON)
    lora_rank: Mapped[int | None] = mapped_column(Integer)  # the largest rank of its LoRA factors; None: dense
    class_names: Mapped[list | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source_format: Mapped[str] = mapped_column(String(10))
    source_sha256: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool] = mapped_column(Boolean)
    class_names: Mapped[list | None] = mapped_column(JSON)
    templates: Mapped[list | None] = mapped_column(JSON)  # prompt templates with "{c}"; None: the defaults
    splits: Mapped[dict] = mapped_column(JSON)
    image_shape: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20), default=JobKind.MERGE.value, server_default=JobKind.MERGE.value)
    method: Mapped[str | None] = mapped_column(String(40))  # None for evaluations
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    task_vector_ids: Mapped[list] = mapped_column(JSON)
    # chaining: the checkpoint a merge is written onto instead of theta_0 (migration 0008 says why no foreign key;
    # the job's input row keeps the checkpoint while the job is queued or running)
    start_checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    params: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(JobStatusType, index=True, default=JobStatus.QUEUED)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    artifacts: Mapped[dict | None] = mapped_column(JSON)  # large method outputs (aTLAS coefficients), served apart
    error: Mapped[dict | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when the broker took the job's id
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # when it last became queued (created, re-queued, released); None for jobs queued before migration 0011
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    inputs: Mapped[list["JobInput"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class JobInput(Base):
    """Which task vectors, datasets and checkpoints a job reads (one per row). RESTRICT: a vector, dataset or
    checkpoint named by a job cannot be deleted under it, nor can the job that made the checkpoint; the delete
    routes first drop the inputs of finished jobs. (On PostgreSQL a job's
    uncommitted input row also holds a key-share lock on the vector, so a racing delete waits, then fails.)"""

    __tablename__ = "job_inputs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task_vector_id: Mapped[str | None] = mapped_column(ForeignKey("task_vectors.id", ondelete="RESTRICT"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    # a merge's start checkpoint, an evaluation's evaluated and reference checkpoints (migration 0012)
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"),
                                                      index=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(20), default="safetensors")
    contents: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


JOB_SECONDS_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, math.inf)  # migration 0013 made one row each


def bucket_label(upper_s: float) -> str:
    """An upper bound as Prometheus writes it in `le` ("1.0", "+Inf")."""
    return "+Inf" if math.isinf(upper_s) else repr(float(upper_s))


class JobDurationBucket(Base):
    """Succeeded jobs' run times as a histogram's totals, one row per bucket (not cumulative): a job adds itself in
    the transaction that records its success. Counted from the rows of succeeded jobs instead, the histogram went
    down when a job was deleted (a counter reset to Prometheus) and each scrape read every job ever run."""

    __tablename__ = "job_duration_buckets"
    le: Mapped[str] = mapped_column(String(20), primary_key=True)  # bucket_label of its upper bound
    jobs: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)

