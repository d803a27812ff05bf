"""Job lifecycle against real processes: cancel, a worker SIGKILLed or stopped mid-job, attempts running out."""
import signal
import time

import pytest

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout_s: float, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def running_with_progress(client, job_id, attempt: int = 1):
    """The job once its given attempt is running and has made progress (a killed attempt's row looks
    running until the reaper notices, so the attempt number tells them apart)."""
    job = client.get_job(job_id)
    if job["status"] == "running" and job["attempts"] == attempt and job["progress"].get("step", 0) > 0:
        return job
    return None


def test_cancel_stops_a_running_job_between_steps(stack, long_job):
    with stack.client() as client:
        job = long_job(client, epochs=500)
        running = wait_until(lambda: running_with_progress(client, job["id"]), 120)
        assert client.http.get(f"/v1/jobs/{job['id']}").headers["retry-after"]
        cancelled = client.cancel_job(job["id"])
        assert cancelled["cancel_requested"] is True
        final = client.wait_for_job(job["id"], timeout_s=60)
    assert final["status"] == "cancelled"
    assert final["result"] is None
    assert running["progress"]["stage"] in ("training", "evaluation")
    assert final["progress"]["stage"] in ("training", "evaluation")  # stopped mid-work, progress kept


def test_cancel_of_a_queued_job_is_immediate(stack, long_job):
    with stack.client() as client:
        blocker = long_job(client, epochs=500)
        wait_until(lambda: running_with_progress(client, blocker["id"]), 120)
        queued = long_job(client, epochs=1)
        assert client.get_job(queued["id"])["status"] == "queued"
        assert client.cancel_job(queued["id"])["status"] == "cancelled"
        client.cancel_job(blocker["id"])
        assert client.wait_for_job(blocker["id"], timeout_s=60)["status"] == "cancelled"
        # The worker drops the cancelled job's message instead of running it.
        time.sleep(2)
        after = client.get_job(queued["id"])
    assert after["status"] == "cancelled"
    assert after["attempts"] == 0


def test_a_job_whose_worker_is_killed_is_requeued_and_finishes(stack, long_job):
    with stack.client() as client:
        job = long_job(client, epochs=30)
        wait_until(lambda: running_with_progress(client, job["id"]), 120)
        stack.kill_worker(stack.workers[-1])
        # Nobody finishes it while no worker runs: it must stay visible as running, not vanish.
        assert client.get_job(job["id"])["status"] in ("running", "queued")
        stack.start_worker()
        restarted = time.monotonic()
        final = client.wait_for_job(job["id"], timeout_s=300)
    print(f"worker SIGKILL: the job finished {time.monotonic() - restarted:.1f} s after a new worker started")
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    assert final["result"]["checkpoint_id"]


def test_a_worker_stopped_mid_job_hands_it_back_and_another_finishes_it(stack, long_job):
    """SIGTERM to the worker's main process, as docker stop sends it: the job stops between steps and goes back
    to the queue with its attempt given back, the worker exits without waiting for it to end, and the next worker
    runs it to the end. (Killed instead, the job would wait for the reaper and lose an attempt.)"""
    with stack.client() as client:
        job = long_job(client, epochs=500)
        wait_until(lambda: running_with_progress(client, job["id"]), 120)
        worker = stack.workers[-1]
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        released = client.get_job(job["id"])
        assert (released["status"], released["attempts"]) == ("queued", 0), released
        assert released["progress"]["stage"] == "released by a stopping worker"
        stack.start_worker()
        wait_until(lambda: running_with_progress(client, job["id"]), 120)
        client.cancel_job(job["id"])  # 500 epochs: the point is that another worker took it up
        final = client.wait_for_job(job["id"], timeout_s=60)
    assert final["status"] == "cancelled" and final["attempts"] == 1


def test_a_job_that_keeps_losing_its_worker_fails_with_a_reason(stack, long_job):
    with stack.client() as client:
        job = long_job(client, epochs=500)
        for attempt in (1, 2, 3):  # max_attempts is 3
            wait_until(lambda attempt=attempt: running_with_progress(client, job["id"], attempt), 120)
            stack.kill_worker(stack.workers[-1])
            stack.start_worker()
        final = client.wait_for_job(job["id"], timeout_s=120)
    assert final["status"] == "failed"
    assert final["error"]["type"] == "/problems/worker-lost"
    assert "3 times" in final["error"]["detail"]
