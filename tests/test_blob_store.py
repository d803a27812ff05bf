"""The local blob store's rules when uploads, jobs and the collector meet on the same bytes."""
import os
import time

from store.blobs import BlobStore


def commit(blobs: BlobStore, content: bytes, age_s: float = 0.0):
    path = blobs.pending_path()
    path.write_bytes(content)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return blobs.commit_file(path)


def test_a_refused_upload_keeps_the_blob_when_the_same_bytes_were_committed_after_it(tmp_path):
    """Two owners upload the same file; the first is refused (its quota) after the second committed the bytes and
    before the second's row is written: the blob must stay for that row."""
    blobs = BlobStore(tmp_path)
    first = commit(blobs, b"a public checkpoint")
    second = commit(blobs, b"a public checkpoint")
    assert first.created and not second.created and first.stamp != second.stamp
    assert blobs.discard(first) is False and blobs.exists(first.sha256)
    assert blobs.discard(second) is False  # it did not create the blob: not its to remove


def test_a_refused_upload_alone_removes_the_blob_it_created(tmp_path):
    blobs = BlobStore(tmp_path)
    only = commit(blobs, b"bytes nobody else has")
    assert blobs.discard(only) is True and not blobs.exists(only.sha256)
    assert list(blobs.tmp_dir.iterdir()) == []


def test_a_file_written_long_before_its_commit_starts_its_grace_at_the_commit(tmp_path):
    """A checkpoint is written, then evaluated (which can outlast the grace period), then committed: the collector
    must not take it for an old unreferenced blob between the commit and its row."""
    blobs = BlobStore(tmp_path)
    late = commit(blobs, b"a merged checkpoint", age_s=7200)
    assert blobs.collect_garbage(lambda: set(), grace_s=3600) == []
    assert blobs.exists(late.sha256)


def test_clean_tmp_passes_over_an_entry_that_goes_while_it_looks(tmp_path, monkeypatch):
    """A writer finishing (its pending file renamed into place) between the listing and the look at the file's
    age aborted the whole sweep with FileNotFoundError."""
    store = BlobStore(tmp_path / "blobs")
    left = store.tmp_dir / "left-by-a-crash"
    left.write_bytes(b"x")
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    listing = store.tmp_dir.iterdir
    monkeypatch.setattr(type(store.tmp_dir), "iterdir", lambda self: iter([self / "renamed-into-place", *listing()]))
    assert store.clean_tmp() == 1 and not left.exists()
