"""The job state machine (store.jobs) in process, on SQLite and PostgreSQL: each transition and its races.

Races are run for real: several threads, each with its own session and connection, call the same
transition at once behind a barrier; exactly one may win.
"""
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from migrations import upgrade
from store import jobs, models
from store.ids import new_id
from store.jobs import JobStatus
from store.models import Checkpoint, Job, JobInput, JobKind, utcnow
from store.queries import delete_unless_in_use
from tests.job_rows import add_queued_job

RACERS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sessions(request, tmp_path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):  # as store.db configures SQLite
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")
            connection.execute("PRAGMA foreign_keys=ON")
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        engine = create_engine(url, pool_size=RACERS + 2)
    upgrade(url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def job_id(sessions) -> str:
    with sessions.begin() as session:
        return add_queued_job(session)


def status(sessions, job_id: str) -> JobStatus:
    with sessions() as session:
        return session.get(Job, job_id).status


def race(sessions, transition: Callable[[Session, int], object]) -> list[object]:
    """RACERS threads run transition(session, index) at once, each committing its own session."""
    barrier = threading.Barrier(RACERS)
    results: list[object] = [None] * RACERS
    errors: list[BaseException] = []

    def racer(index: int) -> None:
        try:
            with sessions() as session:
                barrier.wait()
                results[index] = transition(session, index)
                session.commit()
        except BaseException as error:  # reported below, not swallowed
            errors.append(error)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def far_past():
    return utcnow() - timedelta(hours=1)


def test_job_times_are_the_databases_whatever_each_hosts_clock(sessions, job_id, monkeypatch):
    """A worker host whose clock runs two minutes behind keeps its job under a reaper whose clock runs two minutes
    ahead, and a job's times read in order: with each host's own clock the reaper took the live job as lost."""
    def host_clock(offset: timedelta) -> None:
        class Skewed(datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.now(tz) + offset
        monkeypatch.setattr(models, "datetime", Skewed)

    host_clock(timedelta(minutes=-2))  # the API's and the worker's host
    with sessions.begin() as session:
        jobs.mark_published(session, job_id)
        assert jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
        assert jobs.heartbeat(session, job_id, "w1")
    host_clock(timedelta(minutes=2))  # the reaper's host
    with sessions.begin() as session:
        assert jobs.lost_jobs(session, jobs.stale_before(session, 60)) == []
        assert jobs.unclaimed_jobs(session, republish_after_s=60) == []
        assert jobs.succeed(session, job_id, "w1", {})
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.published_at <= job.started_at <= job.heartbeat_at <= job.finished_at
        assert abs(job.finished_at - datetime.now(models.UTC)) < timedelta(seconds=30)


def test_enqueue_then_claim_heartbeat_progress_succeed(sessions, job_id):
    assert status(sessions, job_id) is JobStatus.QUEUED
    with sessions.begin() as session:
        assert jobs.mark_published(session, job_id)
        assert jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    with sessions.begin() as session:
        assert jobs.heartbeat(session, job_id, "w1") and not jobs.heartbeat(session, job_id, "w2")
        assert jobs.write_progress(session, job_id, "w1", {"stage": "merging"})
        assert not jobs.write_progress(session, job_id, "w2", {"stage": "stolen"})
        job = session.get(Job, job_id)
        checkpoint = Checkpoint(id=new_id("ckpt"), owner="alice", job_id=job_id, sha256="1" * 64, size_bytes=1,
                                format="safetensors", contents={})
        assert not jobs.succeed(session, job_id, "w2", {"checkpoint_id": checkpoint.id}, None, checkpoint)
        assert jobs.succeed(session, job_id, "w1", {"checkpoint_id": checkpoint.id}, None, checkpoint)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.worker_id) == (JobStatus.SUCCEEDED, 1, "w1")
        assert job.progress["stage"] == "done" and session.get(Checkpoint, checkpoint.id) is not None
    with sessions.begin() as session:  # a finished job takes no more transitions
        assert not jobs.claim(session, job_id, "w3", utcnow(), max_attempts=3)
        assert jobs.cancel(session, job_id) is None
        assert not jobs.fail(session, job_id, "w1", jobs.problem("x", "y", "z"))


def test_only_one_of_many_concurrent_claims_wins(sessions, job_id):
    results = race(sessions, lambda session, i: jobs.claim(session, job_id, f"w{i}", far_past(), max_attempts=3))
    assert results.count(True) == 1
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.RUNNING and job.attempts == 1
        assert job.worker_id == f"w{results.index(True)}"


def test_a_claim_repeated_after_its_answer_was_lost_still_holds_the_job(sessions, job_id):
    """store.db.transact runs a claim again when its commit's answer was lost: the second run finds the job
    running under the same claim's id and holds it, without spending an attempt. Another delivery of the job
    while it runs under a live heartbeat leaves it running, though it is on its last attempt."""
    for _ in range(2):
        with sessions.begin() as session:
            assert jobs.claim(session, job_id, "w1:token", far_past(), max_attempts=1)
    with sessions.begin() as session:
        assert not jobs.claim(session, job_id, "w2:token", far_past(), max_attempts=1)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.worker_id, job.attempts) == (JobStatus.RUNNING, "w1:token", 1)


def test_a_stale_running_job_is_requeued_once_then_failed_after_its_attempts(sessions, job_id):
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=2)
    with sessions.begin() as session:  # the heartbeat is fresh: not lost
        assert jobs.lost_jobs(session, far_past()) == []
    stale = utcnow() + timedelta(seconds=1)
    results = race(sessions, lambda session, i: jobs.requeue_lost(session, session.get(Job, job_id), stale, 2))
    assert results.count(JobStatus.QUEUED) == 1 and results.count(None) == RACERS - 1
    assert status(sessions, job_id) is JobStatus.QUEUED
    with sessions.begin() as session:
        assert not jobs.heartbeat(session, job_id, "w1")  # the old worker lost it
        assert jobs.claim(session, job_id, "w2", far_past(), max_attempts=2)
    with sessions.begin() as session:
        assert jobs.requeue_lost(session, session.get(Job, job_id), utcnow() + timedelta(seconds=1), 2) \
            is JobStatus.FAILED
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status is JobStatus.FAILED and job.error["type"] == "/problems/worker-lost"


def test_a_stale_job_past_its_time_limit_fails_with_it_instead_of_running_again(sessions, job_id):
    """Celery's hard limit kills a job that did not honour its soft limit, and acknowledges its message: the row
    stays running with no heartbeat. The reaper fails it with the time limit rather than retry it as a lost
    worker's (each retry would be killed the same way, and end as 'Worker lost')."""
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    stale = utcnow() + timedelta(seconds=1)
    with sessions.begin() as session:  # lost before its limit, though found after it: run again
        session.get(Job, job_id).started_at = utcnow() - timedelta(seconds=7200)
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=3700)
    with sessions.begin() as session:
        assert jobs.requeue_lost(session, session.get(Job, job_id), stale, 3, time_limit_s=3600) is JobStatus.QUEUED
        assert jobs.claim(session, job_id, "w2", far_past(), max_attempts=3)
        job = session.get(Job, job_id)  # beat until the hard limit killed it
        job.started_at, job.heartbeat_at = utcnow() - timedelta(seconds=3800), utcnow() - timedelta(seconds=70)
    with sessions.begin() as session:
        assert jobs.requeue_lost(session, session.get(Job, job_id), stale, 3, time_limit_s=3600) is JobStatus.FAILED
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.error["type"] == "/problems/time-limit" and job.attempts == 2


def test_a_late_delivery_of_a_stale_job_past_its_time_limit_fails_it_instead_of_running_it(sessions, job_id):
    """Celery's hard limit killed the job (its row stays running, beating no more); an older duplicate message
    arrives before the reaper's sweep. The claim fails the job with the time limit, as the reaper would, rather
    than give it another full run."""
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
        job = session.get(Job, job_id)
        job.started_at, job.heartbeat_at = utcnow() - timedelta(seconds=3800), utcnow() - timedelta(seconds=70)
    with sessions.begin() as session:
        assert not jobs.claim(session, job_id, "w2", utcnow() - timedelta(seconds=60), max_attempts=3,
                              time_limit_s=3600)
    with sessions() as session:
        job = session.get(Job, job_id)
    assert job.status is JobStatus.FAILED and job.error["type"] == "/problems/time-limit" and job.attempts == 1


def test_claim_refuses_a_job_out_of_attempts_and_fails_it(sessions, job_id):
    with sessions.begin() as session:
        session.get(Job, job_id).attempts = 3
    with sessions.begin() as session:
        assert not jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    assert status(sessions, job_id) is JobStatus.FAILED


def test_cancel_of_a_queued_job_races_its_claim(sessions, job_id):
    """Half the racers cancel, half claim: either the job was cancelled before any claim (no claim wins), or
    one claim won and the cancels only asked the running job to stop."""
    def transition(session, i):
        if i % 2:
            return jobs.cancel(session, job_id)
        return jobs.claim(session, job_id, f"w{i}", far_past(), max_attempts=3)

    results = race(sessions, transition)
    claims, cancels = results[0::2], results[1::2]
    with sessions() as session:
        job = session.get(Job, job_id)
    if job.status is JobStatus.CANCELLED:
        assert claims.count(True) == 0 and cancels.count(JobStatus.CANCELLED) == 1
    else:
        assert job.status is JobStatus.RUNNING and claims.count(True) == 1 and job.cancel_requested
        assert JobStatus.CANCELLED not in cancels
    with sessions.begin() as session:
        if job.status is JobStatus.RUNNING:
            assert jobs.cancel_requested(session, job_id)
            assert jobs.acknowledge_cancel(session, job_id, job.worker_id)
    assert status(sessions, job_id) is JobStatus.CANCELLED


def test_a_cancel_racing_a_release_is_never_taken_for_a_finished_job(sessions, job_id):
    """A stopping worker hands its running job back (running -> queued) while the owner cancels it: the job ends
    cancelled, or queued carrying the request to its next claim (which cancels it). As two statements, queued then
    running, a cancel on PostgreSQL could miss the job in both states, answer 'finished' and leave it to run."""
    with sessions.begin() as session:
        assert jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)

    def transition(session, i):
        return jobs.release(session, job_id, "w1") if i == 0 else jobs.cancel(session, job_id)

    results = race(sessions, transition)
    released, cancels = results[0], results[1:]
    with sessions() as session:
        job = session.get(Job, job_id)
    assert released and job.cancel_requested  # never queued again without the owner's request
    if job.status is JobStatus.CANCELLED:  # cancelled once queued: the cancels after that found it finished
        assert cancels.count(JobStatus.CANCELLED) == 1 and job.finished_at is not None
    else:  # every cancel came before the release: each asked the running job to stop
        assert job.status is JobStatus.QUEUED and cancels == [JobStatus.RUNNING] * len(cancels)


def test_a_claim_of_a_job_with_a_cancel_request_cancels_it(sessions, job_id):
    with sessions.begin() as session:
        session.get(Job, job_id).cancel_requested = True
    with sessions.begin() as session:
        assert not jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    assert status(sessions, job_id) is JobStatus.CANCELLED


def test_unpublished_queued_jobs_are_found_after_their_grace(sessions, job_id):
    with sessions() as session:
        assert jobs.unpublished_jobs(session, utcnow() + timedelta(seconds=1)) == [job_id]
        assert jobs.unpublished_jobs(session, far_past()) == []
    with sessions.begin() as session:
        jobs.mark_published(session, job_id)
    with sessions() as session:
        assert jobs.unpublished_jobs(session, utcnow() + timedelta(seconds=1)) == []


def test_a_lost_job_whose_cancel_was_requested_is_cancelled_not_requeued(sessions, job_id):
    """No worker is left to honour the cancel: requeueing would hold a queue place (and the owner's active-job
    quota) until some worker claimed it only to cancel it."""
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
        assert jobs.cancel(session, job_id) is JobStatus.RUNNING
    with sessions.begin() as session:
        outcome = jobs.requeue_lost(session, session.get(Job, job_id), utcnow() + timedelta(seconds=1), 3)
    assert outcome is JobStatus.CANCELLED and status(sessions, job_id) is JobStatus.CANCELLED


def test_a_success_repeated_after_its_answer_was_lost_is_still_a_success(sessions, job_id):
    """store.db.transact runs the final write again when its commit landed but the answer was lost."""
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    checkpoint_id = new_id("ckpt")
    for _ in range(2):
        with sessions.begin() as session:
            checkpoint = Checkpoint(id=checkpoint_id, owner="alice", job_id=job_id, sha256="1" * 64, size_bytes=1,
                                    format="safetensors", contents={})
            assert jobs.succeed(session, job_id, "w1", {"checkpoint_id": checkpoint_id}, None, checkpoint)
    with sessions.begin() as session:
        assert not jobs.succeed(session, job_id, "w2", {}, None, None)  # only the worker that held it
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 1


def test_a_queued_job_is_published_again_at_growing_intervals(sessions, job_id):
    """A job waiting behind busy workers is not given a new broker message every interval: each wait is at least
    as long as the job had been queued when last published, counted from when it last became queued."""
    def republished(queued_s_ago: float, published_s_ago: float, created_s_ago: float | None = None) -> bool:
        with sessions.begin() as session:
            job = session.get(Job, job_id)
            job.queued_at = utcnow() - timedelta(seconds=queued_s_ago)
            job.created_at = utcnow() - timedelta(seconds=created_s_ago or queued_s_ago)
            job.published_at = utcnow() - timedelta(seconds=published_s_ago)
        with sessions() as session:
            return jobs.unclaimed_jobs(session, republish_after_s=300) == [job_id]

    assert not republished(queued_s_ago=200, published_s_ago=200)  # published at once, 200 s ago
    assert republished(queued_s_ago=310, published_s_ago=310)
    assert not republished(queued_s_ago=1000, published_s_ago=400)  # had waited 600 s when last published
    assert republished(queued_s_ago=1300, published_s_ago=700)
    # Re-queued after running ten hours and published then: its lost message is not waited on for ten hours.
    assert republished(queued_s_ago=310, published_s_ago=310, created_s_ago=36_000)
    # Waited nine hours behind busy workers, published an hour ago, then a broker restart lost its message: the
    # wait is capped (jobs.REPUBLISH_BACKOFF_MAX, 30 min), not the nine hours it had been queued.
    assert not republished(queued_s_ago=10 * 3600, published_s_ago=29 * 60)
    assert republished(queued_s_ago=10 * 3600, published_s_ago=31 * 60)


def succeeded_with_checkpoint(sessions, job_id: str) -> tuple[str, str]:
    """Run the job to success with a checkpoint row; returns the checkpoint's id and the job's base model's."""
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
        checkpoint = Checkpoint(id=new_id("ckpt"), owner="alice", job_id=job_id, sha256="1" * 64, size_bytes=1,
                                format="safetensors", contents={})
        assert jobs.succeed(session, job_id, "w1", {"checkpoint_id": checkpoint.id}, None, checkpoint)
        return checkpoint.id, session.get(Job, job_id).base_model_id


def enqueue_reader(session: Session, base_model_id: str, checkpoint_id: str) -> Job:
    """A merge starting from the checkpoint, with its input row, as the jobs route builds it."""
    return jobs.enqueue(session, Job(id=new_id("job"), owner="alice", kind=JobKind.MERGE.value,
                                     method="task_arithmetic", base_model_id=base_model_id,
                                     task_vector_ids=[], params={}, seed=0, request_hash="h2",
                                     start_checkpoint_id=checkpoint_id,
                                     inputs=[JobInput(checkpoint_id=checkpoint_id)]))


def test_a_checkpoint_that_a_queued_job_reads_keeps_itself_and_its_job(sessions, job_id):
    """Deleting a finished job deletes its checkpoint: a queued or running reader's input row RESTRICTs both
    deletes; a finished reader's does not."""
    checkpoint_id, base_model_id = succeeded_with_checkpoint(sessions, job_id)
    with sessions.begin() as session:
        assert jobs.readers_of_checkpoints_made_by(session, job_id) == []
        reader = enqueue_reader(session, base_model_id, checkpoint_id)
    with sessions() as session:
        assert jobs.readers_of_checkpoints_made_by(session, job_id) == [reader.id]
        assert jobs.readers_of_checkpoint(session, checkpoint_id) == [reader.id]
        with pytest.raises(IntegrityError):
            jobs.delete_finished(session, job_id)
        session.rollback()
        assert not delete_unless_in_use(session, session.get(Checkpoint, checkpoint_id), JobInput.checkpoint_id)
    with sessions.begin() as session:
        assert jobs.cancel(session, reader.id) is not None
    with sessions.begin() as session:
        assert jobs.delete_finished(session, job_id)
    with sessions() as session:
        assert session.get(Checkpoint, checkpoint_id) is None and session.get(Job, job_id) is None
        assert session.get(Job, reader.id).start_checkpoint_id == checkpoint_id  # the finished reader keeps its name


def test_deleting_a_job_races_jobs_that_start_from_its_checkpoint(sessions, job_id):
    """One racer deletes the finished job (and with it its checkpoint) while the others queue merges starting
    from the checkpoint: either the delete wins and every later reader is refused, or a reader commits first and
    the delete is refused. No reader is ever left queued on a checkpoint that is gone."""
    checkpoint_id, base_model_id = succeeded_with_checkpoint(sessions, job_id)

    def transition(session: Session, index: int) -> str:
        try:
            if index == 0:
                assert jobs.delete_finished(session, job_id)
            else:
                enqueue_reader(session, base_model_id, checkpoint_id)
            session.commit()
            return "committed"
        except IntegrityError:
            session.rollback()
            return "refused"

    outcomes = race(sessions, transition)
    with sessions() as session:
        readers = session.scalars(select(Job.id).where(Job.start_checkpoint_id == checkpoint_id)).all()
        gone = session.get(Checkpoint, checkpoint_id) is None
    assert len(readers) == outcomes[1:].count("committed")
    if outcomes[0] == "committed":
        assert gone and readers == []
    else:
        assert not gone and readers


def test_a_job_released_by_its_stopping_worker_is_queued_with_its_attempt_given_back(sessions, job_id):
    with sessions.begin() as session:
        jobs.claim(session, job_id, "w1", far_past(), max_attempts=3)
    with sessions.begin() as session:
        assert not jobs.release(session, job_id, "w2")  # only the worker that holds it
        assert jobs.release(session, job_id, "w1")
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.worker_id, job.published_at) == (JobStatus.QUEUED, 0, None, None)
        assert job.queued_at > job.created_at
