"""Content-addressed blob store: on the local file system (BlobStore), or on an S3-compatible server
shared by many machines (S3BlobStore), each of which keeps a local cache in the same layout.

Blobs are shared by identical uploads, so a row's delete never removes its blob directly (an upload
of the same bytes may be about to point a new row at it): collect_garbage removes blobs no row
references that nobody has committed for a grace period; a commit of existing bytes refreshes the
blob's time. Each local commit leaves a stamp (the file's inode: a commit of existing bytes replaces the file):
a refused upload removes the blob it created only while the stamp is its own, so a concurrent upload of the same
bytes, which committed after it and is about to add its row, keeps the blob. The check and the removal hold a
lock that commits take too (flock on <root>/.lock), as do the collector's last look at a blob and its removal.
A refused upload to S3 leaves its object to the collector (S3BlobStore.discard).

Files are written under tmp/ while they stream in (hashed on the way), then
fsynced and renamed to sha256/<aa>/<rest>: a reader never sees a half file.
"""
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar
from urllib.parse import urlparse

from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential_jitter

CHUNK = 1024 * 1024
log = logging.getLogger(__name__)
T = TypeVar("T")


class TooLarge(Exception):
    """The stream went past the byte limit it was written under."""


class Committed(NamedTuple):
    """What a commit did: the blob's digest and size, whether the store held those bytes before (created is
    False then), and the stamp this commit left on it."""

    sha256: str
    size: int
    created: bool
    stamp: str


class PendingBlob:
    """A file being written under tmp/, hashed while it grows; removed unless committed."""

    def __init__(self, store: "BlobStore", max_bytes: int | None):
        self._store = store
        self._max_bytes = max_bytes
        self.path = store.pending_path()
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/discard()
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise TooLarge(f"more than {self._max_bytes} bytes")
        self._hash.update(data)
        self._file.write(data)

    def finish(self) -> str:
        """Flush and fsync; the file stays under tmp/ until committed."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.sha256 = self._hash.hexdigest()
        return self.sha256

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "PendingBlob":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def local_path(self, sha256: str) -> Path:
        """Where the blob's file lives on this machine (for a remote store: its cached copy)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256[2:]

    @staticmethod
    def digest_at(path: Path) -> str:
        """The digest whose local_path this is."""
        return path.parent.name + path.name

    def path(self, sha256: str) -> Path:
        """A local file with the blob's bytes, to read or memory-map."""
        return self.local_path(sha256)

    def exists(self, sha256: str) -> bool:
        return self.local_path(sha256).is_file()

    def pending(self, max_bytes: int | None = None) -> PendingBlob:
        return PendingBlob(self, max_bytes)

    def commit(self, blob: PendingBlob) -> Committed:
        """Move a finished pending blob into place."""
        if blob.sha256 is None:
            blob.finish()
        return self.commit_file(blob.path, blob.sha256)

    def pending_path(self, suffix: str = "") -> Path:
        """A fresh path under tmp/ for code that writes a whole file itself, then calls commit_file."""
        return self.tmp_dir / f"{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}{suffix}"

    def commit_file(self, path: Path, known_sha256: str | None = None) -> Committed:
        """Hash, fsync and move a finished file from tmp/ into place.

        known_sha256: the digest its writer took of the bytes as it wrote and fsynced them (the engine's
        StreamingWriter does), which spares reading the file again. Bytes already stored are replaced by this
        copy (a new inode: this commit's stamp; readers that have the old file open keep reading it).
        """
        if known_sha256 is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                os.fsync(f.fileno())
            known_sha256 = digest.hexdigest()
        sha, size = known_sha256, path.stat().st_size
        created_remotely = self._store(sha, path)
        target = self.local_path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            existed = target.exists()
            os.replace(path, target)
            os.utime(target)  # rename keeps the writer's time: the collector's grace period starts at the commit
            inode = target.stat().st_ino
        _fsync_dir(target.parent)
        created = created_remotely if created_remotely is not None else not existed
        return Committed(sha, size, created, str(inode))

    def _store(self, sha256: str, path: Path) -> bool | None:
        """Make the blob durable where every machine finds it, returning whether it was not stored before; None
        for the local store, where the file moved into place is that."""
        return None

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialises commits with the checks that precede a removal, across this machine's processes."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _stamp(self, sha256: str) -> str | None:
        try:
            return str(self.local_path(sha256).stat().st_ino)
        except FileNotFoundError:
            return None

    def delete(self, sha256: str) -> None:
        self.local_path(sha256).unlink(missing_ok=True)

    def discard(self, committed: Committed) -> bool:
        """Remove the blob a refused upload created, unless a later commit of the same bytes (an upload about
        to point its row at them) left its own stamp; the caller has checked that no row points at it.
        Returns whether it went."""
        if not committed.created:
            return False
        with self._exclusive():
            if self._stamp(committed.sha256) != committed.stamp:
                return False
            self.delete(committed.sha256)
            return True

    def keep_fresh(self, paths: Iterable[Path]) -> None:
        """Mark blobs a running job reads as in use (a remote store's cache keeps them); nothing to do here."""

    def collect_garbage(self, referenced: Callable[[], set[str]], grace_s: float) -> list[str]:
        """Remove stored blobs that no row references and nobody committed for grace_s; returns their digests.

        The cutoff is taken before referenced() reads the rows: a blob committed after the cutoff is
        kept for its age, one committed before has its row read (uploads commit the row right after). Each
        removal looks at the blob's time again under the commits' lock, so a commit that lands meanwhile keeps it.
        """
        cutoff = time.time() - grace_s
        keep = referenced()
        removed = []
        for path in (self.root / "sha256").glob("*/*"):
            sha = self.digest_at(path)
            if sha in keep:
                continue
            with self._exclusive():
                if _older_than(path, cutoff):
                    path.unlink()
                    removed.append(sha)
        return removed

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove pending files left by crashed writers."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.tmp_dir.iterdir():
            if _older_than(entry, cutoff):  # gone since it was listed (a writer finished): not a crash's leftover
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def writable(self) -> bool:
        probe = self.tmp_dir / f".probe-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


COPY_PART_BYTES = 512 * 2**20  # 16 parts for the largest upload (TVFORGE_MAX_UPLOAD_BYTES: 8 GiB)


class S3BlobStore(BlobStore):
    """Blobs on an S3-compatible server (AWS S3, MinIO), shared by API and workers on many machines.

    Objects are keyed like the local store's files (<prefix>sha256/ab/cdef...). Each machine keeps what
    it reads in a local cache under root: uploads and checkpoints are written to local tmp/ first,
    uploaded once whole, then moved into the cache; a path() not cached yet is downloaded to tmp/ and
    renamed into place, so a reader never sees a partial file. Credentials and region come from boto3's
    usual sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...).
    """

    CACHE_MIN_AGE_S = 600.0  # a cached copy used this recently is never pruned: a reader may be about to open it
    # S3 copies an object in one request up to 5 GB (a larger one answers 400): one re-committed past that (a large
    # base model uploaded again) is copied in parts of COPY_PART_BYTES
    single_copy_max_bytes = 5 * 1000**3

    def __init__(self, root: Path, url: str, endpoint_url: str | None = None, cache_max_bytes: int | None = None):
        import boto3
        from botocore.config import Config

        super().__init__(root)
        self.cache_max_bytes = cache_max_bytes
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self.client = boto3.client("s3", endpoint_url=endpoint_url,
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            self.client.create_bucket(Bucket=self.bucket)
            # An upload cut off mid-way (a killed process) leaves its parts, which no listing of objects shows to
            # the collector: the bucket drops them after a day. A bucket that exists keeps its operator's rules.
            # MinIO refuses the rule (its issue 15681) and purges such parts after 24 h itself: best effort.
            try:
                self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket, LifecycleConfiguration={"Rules": [{
                    "ID": "tvforge-abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": self.prefix},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]})
            except ClientError:
                log.info("bucket %s: the server refused a rule to abort abandoned uploads; it keeps its own",
                         self.bucket, exc_info=True)

    def key(self, sha256: str) -> str:
        self.local_path(sha256)  # validates the digest
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256[2:]}"

    def _head(self, sha256: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def path(self, sha256: str) -> Path:
        local = self.local_path(sha256)
        if local.is_file():
            os.utime(local)  # used again: the cache keeps the most recently used copies
            return local
        partial = self.pending_path(".download")
        try:
            self.client.download_file(self.bucket, self.key(sha256), str(partial))
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, local)
            _fsync_dir(local.parent)
        finally:
            partial.unlink(missing_ok=True)
        self.prune_cache()
        return local

    def prune_cache(self) -> int:
        """Drop the least recently used cached copies while the cache holds more than cache_max_bytes (they
        stay in the bucket; a later path() fetches them again). Returns how many went."""
        if self.cache_max_bytes is None:
            return 0
        entries = []
        for path in (self.root / "sha256").glob("*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed, protected_after = 0, time.time() - self.CACHE_MIN_AGE_S
        for mtime, size, path in sorted(entries):
            if total <= self.cache_max_bytes or mtime >= protected_after:
                break
            with self._exclusive():
                if not _older_than(path, protected_after):  # committed or used since it was listed
                    continue
                path.unlink()  # a process that has it open or mapped keeps reading it
            removed += 1
            total -= size
        return removed

    def keep_fresh(self, paths: Iterable[Path]) -> None:
        """A running job's inputs count as used now, so prune_cache leaves them (its evaluation reopens files
        long after the job resolved their paths)."""
        for path in paths:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass

    def _store(self, sha256: str, path: Path) -> bool:
        key = self.key(sha256)
        with self._exclusive():  # this machine's collector cannot remove it between the question and the touch
            if self._head(sha256) is not None:
                # In use again: rewriting its metadata restarts the collector's grace period (LastModified).
                from boto3.s3.transfer import TransferConfig

                self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, key,
                                 ExtraArgs={"Metadata": {"touched": str(time.time())}, "MetadataDirective": "REPLACE"},
                                 Config=TransferConfig(multipart_threshold=self.single_copy_max_bytes,
                                                       multipart_chunksize=COPY_PART_BYTES))
                return False
        self.client.upload_file(str(path), self.bucket, key)
        return True

    def discard(self, committed: Committed) -> bool:
        """Leaves the object to the collector, which removes it once no row references it past the grace period.
        S3 cannot write an object only where none exists for uploads of every size (multipart ones), so two
        uploads of the same bytes may both find none and both take themselves for its creator: neither can tell
        whether the other's row is about to point at it."""
        return False

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        super().delete(sha256)

    def collect_garbage(self, referenced: Callable[[], set[str]], grace_s: float) -> list[str]:
        """As the local store's, over the bucket's objects (LastModified is the last commit); cached copies
        of removed objects go too. A listed candidate is asked for its time again just before it is removed, as
        a listing page may be minutes old by then. This machine's commits wait for that question and the delete
        (the lock); S3 has no conditional delete, so a commit from another machine in the moment between them can
        still lose its blob."""
        cutoff = time.time() - grace_s
        keep = referenced()
        removed = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=f"{self.prefix}sha256/")
        for page in pages:
            for item in page.get("Contents", []):
                folder, name = item["Key"].rsplit("/", 2)[-2:]
                sha = folder + name
                if sha in keep or item["LastModified"].timestamp() >= cutoff:
                    continue
                with self._exclusive():
                    head = self._head(sha)
                    if head is not None and head["LastModified"].timestamp() < cutoff:
                        self.delete(sha)
                        removed.append(sha)
        for path in (self.root / "sha256").glob("*/*"):  # copies cached here of objects removed elsewhere
            sha = self.digest_at(path)
            if sha not in keep and path.stat().st_mtime < cutoff and not self.exists(sha):
                path.unlink(missing_ok=True)
        return removed

    def writable(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:  # any client or connection error: not usable
            return False
        return super().writable()


def storage_unavailable(error: BaseException) -> bool:
    """A remote store that could not answer now (a connection refused, cut or timed out; a 5xx; throttling), after
    boto3's own retries: the same call may succeed later. A 4xx (no such key, access denied) would fail again, and
    so would anything that is not boto's: only boto3's transfer wrappers are looked into, for the error they gave
    up on (an exception merely raised while one was handled, a time limit say, is no outage)."""
    try:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
        from s3transfer.exceptions import RetriesExceededError
    except ImportError:  # no S3 support installed: nothing remote to wait for
        return False
    if isinstance(error, ConnectionError | HTTPClientError):
        return True
    if isinstance(error, ClientError):
        response = error.response
        return (response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
                or response.get("Error", {}).get("Code") in ("SlowDown", "Throttling", "RequestTimeout"))
    if isinstance(error, RetriesExceededError):
        return storage_unavailable(error.last_exception)
    if isinstance(error, S3UploadFailedError):  # raised while handling the ClientError it names
        cause = error.__cause__ or error.__context__
        return cause is not None and storage_unavailable(cause)
    return False


def through_storage_outages(call: Callable[[], T], retry_for_s: float) -> T:
    """call(), run again while the remote store is unavailable (storage_unavailable), for up to retry_for_s; then
    the last error is raised. For a worker's reads and its checkpoint's commit, both safe to repeat (a commit
    uploads before it moves the file into place): a job that has done its work is not failed for a blip."""
    retrying = Retrying(retry=retry_if_exception(storage_unavailable), stop=stop_after_delay(retry_for_s),
                        wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.5), reraise=True,
                        before_sleep=before_sleep_log(log, logging.WARNING))
    return retrying(call)


@lru_cache
def blob_store_at(root: Path, s3_url: str | None = None, s3_endpoint_url: str | None = None,
                  cache_max_bytes: int | None = None) -> BlobStore:
    if s3_url:
        return S3BlobStore(root, s3_url, s3_endpoint_url, cache_max_bytes)
    return BlobStore(root)


def get_blob_store() -> BlobStore:
    from tvforge.settings import get_settings

    settings = get_settings()
    return blob_store_at(settings.resolved_blob_dir, settings.blob_s3_url, settings.blob_s3_endpoint_url,
                         settings.blob_cache_max_bytes)
