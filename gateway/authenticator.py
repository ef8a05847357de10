"""Decide who a key belongs to: cache first, then one store lookup.

Positive answers stay in a TTL cache for `cache.ttl_seconds`, but never past
the token's `expires_at`. Negative answers (unknown, revoked, expired,
inactive owner) stay in a smaller cache for `cache.negative_ttl_seconds`.
Concurrent misses for one key share a single store query.

Stale-if-error: a positive answer stays for `cache.stale_if_error_seconds`
past its TTL. Such a stale entry is looked up again like a miss, but when the
lookup raises `StoreUnavailable` it is served as is, so valid keys keep
working through a short store outage. Revoked, expired and unknown keys are never in the
positive cache, so they never benefit.

A key found under an older secret of `tokens.secret` is re-hashed to the
first secret in the background (see `gateway.rotation`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from cachetools import TLRUCache, TTLCache

from gateway.config import CacheConfig
from gateway.errors import AuthenticationFailed, AuthFailureReason, StoreUnavailable
from gateway.metrics import GatewayMetrics, StoreTimer
from gateway.rotation import TokenRehasher
from gateway.store import OWNER_FIELD, TokenStore
from gateway.tokens import hash_token, is_well_formed_key

logger = logging.getLogger(__name__)

# After a failed lookup, stale entries are served without asking the store
# again for this many seconds, so that a hung store costs one timeout per
# interval instead of one per request.
STORE_RETRY_INTERVAL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """The owner of an authenticated key, as cached and forwarded.

    `expires_at` is a POSIX timestamp or None; `user_id` is the owner's id as
    sent in the trusted header (24 hex digits for an ObjectId).
    """

    user_id: str
    token_id: Any
    token_prefix: str
    scopes: tuple[str, ...]
    expires_at: float | None
    user_agents: frozenset[str]

    def has_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclasses.dataclass(frozen=True, slots=True)
class _CachedIdentity:
    identity: Identity
    fresh_until: float  # time.monotonic() value after which the entry is stale


class Authenticator:
    """Authenticate keys against a `TokenStore` with positive and negative caches."""

    def __init__(
        self,
        store: TokenStore,
        secrets: Sequence[str],
        cache_config: CacheConfig,
        clock: Callable[[], float] = time.time,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.store = store
        self.secrets = tuple(secrets)
        self.cache_ttl = cache_config.ttl_seconds
        self.stale_if_error = cache_config.stale_if_error_seconds
        self.clock = clock
        self.metrics = metrics or GatewayMetrics()
        self.rehasher = TokenRehasher(store, self.metrics)
        self.check_users = store.users is not None
        self.positive: TLRUCache[str, _CachedIdentity] = TLRUCache(cache_config.max_entries, self._positive_ttu)
        self.negative: TTLCache[str, AuthFailureReason] = TTLCache(
            cache_config.negative_max_entries, cache_config.negative_ttl_seconds
        )
        self._pending: dict[str, asyncio.Future[Identity]] = {}
        self._evictions = 0
        self._last_store_failure = -STORE_RETRY_INTERVAL_SECONDS

    async def authenticate(self, key: str) -> Identity:
        """Return the identity owning `key`.

        Raises `AuthenticationFailed` with the reason when the key does not
        authenticate (a malformed key fails without a store query), and `StoreUnavailable` when the store cannot answer.
        """
        if not is_well_formed_key(key):
            raise AuthenticationFailed(AuthFailureReason.INVALID)
        cache_key = hash_token(self.secrets[0], key)

        cached = self.positive.get(cache_key)
        if cached is not None:
            if cached.identity.has_expired(self.clock()):
                raise AuthenticationFailed(AuthFailureReason.EXPIRED)
            if time.monotonic() < cached.fresh_until:
                self.metrics.cache["hit"].inc()
                return cached.identity
            return await self._revalidate(key, cache_key, cached.identity)
        reason = self.negative.get(cache_key)
        if reason is not None:
            self.metrics.cache["negative_hit"].inc()
            raise AuthenticationFailed(reason)

        self.metrics.cache["miss"].inc()
        return await self._shared_lookup(key, cache_key)

    def evict_token(self, token_id: Any) -> int:
        """Drop every cached answer for the token `token_id`; return how many were dropped.

        Scans the positive cache: revocations are rare, and the scan of
        100,000 entries takes milliseconds.
        """
        self._evictions += 1
        stale = [cache_key for cache_key, cached in self.positive.items() if cached.identity.token_id == token_id]
        for cache_key in stale:
            self.positive.pop(cache_key, None)
        return len(stale)

    def forget_failure(self, token_hash: str) -> None:
        """Drop the negative answer cached for `token_hash`, as when a token with that hash was just created."""
        self.negative.pop(token_hash, None)

    def clear(self) -> None:
        self.positive.clear()
        self.negative.clear()

    async def _revalidate(self, key: str, cache_key: str, stale: Identity) -> Identity:
        if time.monotonic() - self._last_store_failure < STORE_RETRY_INTERVAL_SECONDS:
            return self._serve_stale(stale)
        try:
            return await self._shared_lookup(key, cache_key)
        except StoreUnavailable:
            return self._serve_stale(stale)

    def _serve_stale(self, stale: Identity) -> Identity:
        self.metrics.cache["stale"].inc()
        return stale

    async def _shared_lookup(self, key: str, cache_key: str) -> Identity:
        pending = self._pending.get(cache_key)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(key, cache_key))
            self._pending[cache_key] = pending
            pending.add_done_callback(lambda future: self._finish_lookup(cache_key, future))
        return await asyncio.shield(pending)

    async def _look_up(self, key: str, cache_key: str) -> Identity:
        hashes = [cache_key] + [hash_token(secret, key) for secret in self.secrets[1:]]
        evictions_before = self._evictions
        try:
            with StoreTimer(self.metrics, "find_token"):
                document = await self.store.find_token(hashes)
        except StoreUnavailable:
            self._last_store_failure = time.monotonic()
            raise
        if document is None:
            self._remember_failure(cache_key, AuthFailureReason.INVALID)

        reason = self._failure_reason(document)
        if reason is not None:
            self._remember_failure(cache_key, reason)

        identity = _identity_from(document)
        # A document read before an eviction may predate a revocation, so
        # it serves this request but is not cached.
        if self._evictions == evictions_before:
            self.positive[cache_key] = _CachedIdentity(identity, time.monotonic() + self.cache_ttl)
        if document.get("token_hash") != cache_key:
            self.rehasher.schedule(identity.token_id, document["token_hash"], cache_key)
        return identity

    def _failure_reason(self, document: dict[str, Any]) -> AuthFailureReason | None:
        if document.get("revoked_at") is not None:
            return AuthFailureReason.REVOKED
        expires_at = document.get("expires_at")
        if expires_at is not None and _timestamp(expires_at) <= self.clock():
            return AuthFailureReason.EXPIRED
        if self.check_users and not _is_active_owner(document.get(OWNER_FIELD) or []):
            return AuthFailureReason.INACTIVE_USER
        return None

    def _remember_failure(self, cache_key: str, reason: AuthFailureReason) -> NoReturn:
        # A stale positive entry must not outlive a lookup that rejected the key.
        self.positive.pop(cache_key, None)
        self.negative[cache_key] = reason
        raise AuthenticationFailed(reason)

    def _finish_lookup(self, cache_key: str, future: asyncio.Future[Identity]) -> None:
        self._pending.pop(cache_key, None)
        if not future.cancelled():
            # Mark the exception as retrieved: every waiter may have gone.
            future.exception()

    def _positive_ttu(self, cache_key: str, cached: _CachedIdentity, now: float) -> float:
        # `now` is cachetools' monotonic clock; expires_at is wall-clock time.
        ttl = self.cache_ttl + self.stale_if_error
        expires_at = cached.identity.expires_at
        if expires_at is not None:
            ttl = min(ttl, expires_at - self.clock())
        return now + ttl


def _is_active_owner(owners: list[dict[str, Any]]) -> bool:
    # udata treats a user as active only when `active` is true and `deleted` unset.
    return bool(owners) and owners[0].get("active") is True and owners[0].get("deleted") is None


def _identity_from(document: dict[str, Any]) -> Identity:
    expires_at = document.get("expires_at")
    return Identity(
        user_id=str(document["user"]),
        token_id=document["_id"],
        token_prefix=document.get("token_prefix") or "",
        scopes=tuple(document.get("scopes") or ()),
        expires_at=None if expires_at is None else _timestamp(expires_at),
        user_agents=frozenset(document.get("user_agents") or ()),
    )


def _timestamp(value: datetime.datetime) -> float:
    # The client is tz_aware, so stored datetimes come back as aware UTC values.
    # A naive value (a client configured otherwise) is UTC by udata's convention.
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()
