"""Per-owner rate limits on a real server: a burst past the limit gets 429 with Retry-After and RateLimit-*,
another owner is not affected, and the window frees up again."""
import time

import httpx
import pytest

from tests.conftest import Stack, _redis_db

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory, redis_url):
    live = Stack(tmp_path_factory.mktemp("limited"), f"{redis_url.rsplit('/', 1)[0]}/{next(_redis_db)}",
                 rate_limit="5/2seconds")
    live.start_api()
    yield live
    live.stop()


def _get(stack, key: str) -> httpx.Response:
    return httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_a_burst_past_the_limit_gets_429_and_the_window_frees_up(limited_stack):
    responses = [_get(limited_stack, limited_stack.owner_key) for _ in range(8)]
    assert [r.status_code for r in responses[:5]] == [200] * 5
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    refused = limited[0]
    assert refused.headers["content-type"] == "application/problem+json"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert refused.headers["ratelimit-limit"] == "5" and refused.headers["ratelimit-remaining"] == "0"
    assert "5 per 2 second" in refused.json()["detail"]
    # Another owner has a window of their own.
    assert _get(limited_stack, limited_stack.other_key).status_code == 200
    time.sleep(int(refused.headers["retry-after"]) + 0.2)
    assert _get(limited_stack, limited_stack.owner_key).status_code == 200


def test_a_refused_key_is_not_counted_against_anyone(limited_stack):
    for _ in range(10):
        assert _get(limited_stack, "not-a-key").status_code == 401
    time.sleep(2.2)
    assert _get(limited_stack, limited_stack.other_key).status_code == 200


def test_the_sdk_waits_out_a_429_as_retry_after_says(limited_stack):
    """The SDK retries a 429 (nothing was done) after its Retry-After, as it does a 503."""
    from tvforge.client import TvforgeClient

    time.sleep(2.2)  # a fresh window
    with TvforgeClient(limited_stack.url, limited_stack.owner_key) as client:
        statuses = [client.request("GET", "/v1/jobs").status_code for _ in range(8)]
    assert statuses == [200] * 8  # the calls past the limit waited for the window instead of failing
