"""Content-addressed blob store on the local file system.

Files are written under tmp/ while they stream in (hashed on the way), then
fsynced and renamed to sha256/<aa>/<rest>: a reader never sees a half file.
"""
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


class TooLarge(Exception):
    """The stream went past the byte limit it was written under."""


class PendingBlob:
    """A file being written under tmp/, hashed while it grows; removed unless committed."""

    def __init__(self, store: "BlobStore", max_bytes: int | None):
        self._store = store
        self._max_bytes = max_bytes
        fd_path = store.tmp_dir / f"{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}"
        self.path = fd_path
        self._file: BinaryIO = open(fd_path, "wb")  # noqa: SIM115 - closed in finish()/discard()
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise TooLarge(f"more than {self._max_bytes} bytes")
        self._hash.update(data)
        self._file.write(data)

    def copy_from(self, source: BinaryIO) -> None:
        while chunk := source.read(CHUNK):
            self.write(chunk)

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

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def pending(self, max_bytes: int | None = None) -> PendingBlob:
        return PendingBlob(self, max_bytes)

    def commit(self, blob: PendingBlob) -> bool:
        """Move a finished pending blob into place. Returns False if that content was already stored."""
        if blob.sha256 is None:
            blob.finish()
        target = self.path(blob.sha256)
        if target.exists():
            blob.discard()
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(blob.path, target)
        _fsync_dir(target.parent)
        return True

    def put_file(self, source: Path) -> tuple[str, int, bool]:
        """Store a copy of a local file; returns (sha256, size, created)."""
        with self.pending() as blob, open(source, "rb") as f:
            blob.copy_from(f)
            sha = blob.finish()
            created = self.commit(blob)
            return sha, blob.size, created

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove pending files left by crashed writers."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.tmp_dir.iterdir():
            if entry.stat().st_mtime < cutoff:
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def get_blob_store() -> BlobStore:
    from app.settings import get_settings

    return BlobStore(get_settings().resolved_blob_dir)
