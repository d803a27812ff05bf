"""Per-owner request rate limits (the `limits` library): a moving window per owner, kept in memory in the
embedded service and in Redis when several API processes serve one store (TVFORGE_RATE_LIMIT_STORAGE).
Over the limit, a request gets 429 with Retry-After and the draft IETF RateLimit-* fields."""
import math
import time
from functools import lru_cache

from limits import parse_many, storage
from limits.strategies import MovingWindowRateLimiter

from app.problems import Problem
from tvforge.settings import Settings


class OwnerRateLimits:
    def __init__(self, spec: str, storage_uri: str):
        self.items = parse_many(spec) if spec.strip() else []
        self.limiter = MovingWindowRateLimiter(storage.storage_from_string(storage_uri))

    @property
    def in_process(self) -> bool:
        """Whether a check stays in this process (no limits, or counters in its memory): no network wait."""
        return not self.items or isinstance(self.limiter.storage, storage.MemoryStorage)

    def check(self, owner: str) -> None:
        """Count one request of owner's; a Problem 429 if any limit is spent."""
        for item in self.items:
            if not self.limiter.hit(item, "owner", owner):
                reset_at, _remaining = self.limiter.get_window_stats(item, "owner", owner)
                retry_after = max(1, math.ceil(reset_at - time.time()))
                raise Problem(429, f"Too many requests: the limit is {item}; retry in {retry_after} s.",
                              slug="rate-limited",
                              headers={"Retry-After": str(retry_after), "RateLimit-Limit": str(item.amount),
                                       "RateLimit-Remaining": "0", "RateLimit-Reset": str(retry_after)})


@lru_cache(maxsize=4)
def _limits(spec: str, storage_uri: str) -> OwnerRateLimits:
    return OwnerRateLimits(spec, storage_uri)


def rate_limits(settings: Settings) -> OwnerRateLimits:
    return _limits(settings.rate_limit, settings.rate_limit_storage)
