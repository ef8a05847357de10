"""Bound the store queries that one client can spend on keys that fail.

Caching rejected keys stops a client that repeats one bad key, but a client
that sends a new random key with every request misses both caches every
time. `FailedLookupLimiter` keeps a token bucket per client address: each
store lookup that ends in a failure takes one token, and a client with an
empty bucket gets no store lookup until the bucket refills. The buckets live
in an LRU cache, so memory stays bounded whatever the number of addresses.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from cachetools import LRUCache

# An IPv6 host usually owns a whole /64, so every address in it counts as the same client.
IPV6_CLIENT_PREFIX_LENGTH = 64


class _Bucket:
    __slots__ = ("tokens", "updated_at")

    def __init__(self, tokens: float, updated_at: float) -> None:
        self.tokens = tokens
        self.updated_at = updated_at


class FailedLookupLimiter:
    """A token bucket of failed store lookups per client address.

    `rate` tokens per second refill each bucket up to `burst`; at most
    `max_clients` buckets are kept, the least recently used dropped first.
    A `rate` of 0 turns the limiter off: every client is allowed.
    """

    def __init__(self, rate: float, burst: int, max_clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.buckets: LRUCache[str, _Bucket] = LRUCache(max_clients)

    @property
    def is_enabled(self) -> bool:
        return self.rate > 0

    def allows(self, address: str) -> bool:
        """Tell whether the client at `address` may spend a store lookup now."""
        if not self.is_enabled:
            return True
        bucket = self.buckets.get(client_key(address))
        return bucket is None or self._refill(bucket) >= 1.0

    def charge(self, address: str) -> None:
        """Take one token from the bucket of `address` after a failed lookup."""
        if not self.is_enabled:
            return
        key = client_key(address)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(self.burst, self.clock())
        bucket.tokens = max(0.0, self._refill(bucket) - 1.0)

    def retry_after(self, address: str) -> float:
        """Return the seconds until `address` may spend a lookup again (0 when it may now)."""
        bucket = self.buckets.get(client_key(address)) if self.is_enabled else None
        if bucket is None:
            return 0.0
        return max(0.0, (1.0 - self._refill(bucket)) / self.rate)

    def _refill(self, bucket: _Bucket) -> float:
        now = self.clock()
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated_at) * self.rate)
        bucket.updated_at = now
        return bucket.tokens


def client_key(address: str) -> str:
    """Return the bucket key of `address`: the address itself, or its /64 network for IPv6."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX_LENGTH), strict=False))
