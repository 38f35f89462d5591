"""Per-key limits and usage for the ingress: requests per second and tokens per minute, each a token
bucket per API key, and the per-key counters that go to Ray's metrics.

A key is known everywhere outside the ingress's memory by its id, `key_id(key)`: `key-` and a short
SHA-256 prefix. Metrics, logs and a config's `limits.keys` name keys by id; the key itself is never written.
With no keys configured (a loopback app, or `auth: none`), every request is the caller `anonymous`.

Limits hold per ingress replica: an app with N ingress replicas lets a key through up to N times its
limit (the default is one replica). Tokens are charged when a request has been answered (prompt plus
completion tokens), so one request may overdraw a key's bucket; its next request waits until the
bucket is positive again. A request over a limit is a 429 with Retry-After (RESOURCE_EXHAUSTED over
gRPC, whose details name the wait: Serve's gRPC proxy drops a failed call's trailing metadata), and
counts as throttled.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

ANONYMOUS = "anonymous"  # the caller of an app that takes no keys


def key_id(key: str | bytes) -> str:
    """A key's name in metrics, logs and configs: `key-` and the first 12 hex digits of its SHA-256
    (a string in YAML whatever the digits)."""
    return "key-" + hashlib.sha256(key if isinstance(key, bytes) else key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Limit:
    """One key's limits; 0 is no limit."""
    requests_per_second: float = 0.0  # sustained rate; a burst of up to max(1, rate) requests
    tokens_per_minute: int = 0  # prompt plus completion tokens, refilled continuously

    def __post_init__(self) -> None:
        if self.requests_per_second < 0 or self.tokens_per_minute < 0:
            raise ValueError("requests_per_second and tokens_per_minute: must be 0 (no limit) or positive")


@dataclass(frozen=True)
class Limits:
    """A serve config's `limits`: `default` for every key, `keys` by key id (`key_id`, which the
    ingress logs for each key at start) for the ones that differ."""
    default: Limit = field(default_factory=Limit)
    keys: dict[str, Limit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.keys:
            if name != ANONYMOUS and not re.fullmatch(r"key-[0-9a-f]{12}", name):
                raise ValueError(f"keys: {name!r} is not a key id (key- and 12 hex digits, what the ingress logs "
                                 f"for each key at start; never the key itself) or {ANONYMOUS}")

    def of(self, caller: str) -> Limit:
        return self.keys.get(caller, self.default)


class Bucket:
    """A token bucket: `capacity` at most, refilled at `rate` a second. Its level may go below zero
    (tokens charged after the fact); nothing more is let through until it is positive again."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.at = capacity, time.monotonic()

    def refill(self) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches `need` (0 when it has)."""
        return max(0.0, (need - self.refill()) / self.rate)


class Limiter:
    """Admits or throttles each caller's requests and charges its tokens, by the caller's Limit."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.requests: dict[str, Bucket] = {}
        self.tokens: dict[str, Bucket] = {}

    def _buckets(self, caller: str) -> tuple[Bucket | None, Bucket | None]:
        limit = self.limits.of(caller)
        if limit.requests_per_second and caller not in self.requests:
            self.requests[caller] = Bucket(limit.requests_per_second, max(1.0, limit.requests_per_second))
        if limit.tokens_per_minute and caller not in self.tokens:
            self.tokens[caller] = Bucket(limit.tokens_per_minute / 60.0, float(limit.tokens_per_minute))
        return self.requests.get(caller), self.tokens.get(caller)

    def admit(self, caller: str) -> tuple[str, float] | None:
        """None if the caller's request may go ahead (it is counted against its rate), else (the limit it
        is over, seconds until it would be let through)."""
        requests, tokens = self._buckets(caller)
        if tokens is not None and (wait := tokens.wait_s(1e-9)) > 0:
            return "tokens_per_minute", wait
        if requests is not None:
            if (wait := requests.wait_s(1.0)) > 0:
                return "requests_per_second", wait
            requests.level -= 1.0
        return None

    def charge(self, caller: str, tokens: int) -> None:
        bucket = self._buckets(caller)[1]
        if bucket is not None:
            bucket.refill()
            bucket.level -= tokens
