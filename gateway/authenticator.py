"""Decide who a key belongs to: cache first, then one store lookup.

Positive answers stay in a TTL cache for `cache.ttl_seconds`, but never past
the token's `expires_at`. Negative answers (unknown, revoked, expired,
inactive owner) stay in a smaller cache for `cache.negative_ttl_seconds`.
Concurrent misses for one key share a single store query. During a migration
from plaintext keys, a key missing from `api_token` is looked up in the
users' legacy field and, when exactly one user holds it, migrated on the spot.

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

from cachetools import TTLCache
from pymongo.errors import DuplicateKeyError

from gateway.config import CacheConfig
from gateway.errors import AuthenticationFailed, AuthFailureReason, StoreUnavailable
from gateway.legacy_keys import LegacyKeyStore, migrated_token
from gateway.limiter import FailedLookupLimiter
from gateway.metrics import GatewayMetrics, StoreTimer
from gateway.owner_cache import OwnerIndexedCache
from gateway.rotation import TokenRehasher
from gateway.store import OWNER_FIELD, TokenStore, is_usable_user_id
from gateway.tokens import hash_token, is_well_formed_key, token_hasher

logger = logging.getLogger(__name__)

# Shared by every cached identity without User-Agents: an empty frozenset
# takes 216 bytes, about a quarter of a cache entry (bench/cache_memory.py).
NO_USER_AGENTS: frozenset[str] = frozenset()

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
    """Authenticate keys against a `TokenStore` with positive and negative caches.

    With `legacy_keys`, a key unknown to the store is looked up there too.
    """

    def __init__(
        self,
        store: TokenStore,
        secrets: Sequence[str],
        cache_config: CacheConfig,
        clock: Callable[[], float] = time.time,
        legacy_keys: LegacyKeyStore | None = None,
        failed_lookups: FailedLookupLimiter | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.store = store
        self.legacy_keys = legacy_keys
        self.failed_lookups = failed_lookups
        self.secrets = tuple(secrets)
        self._hash_with_first_secret = token_hasher(self.secrets[0])
        self.cache_ttl = cache_config.ttl_seconds
        self.stale_if_error = cache_config.stale_if_error_seconds
        self.clock = clock
        self.metrics = metrics or GatewayMetrics()
        self.rehasher = TokenRehasher(store, self.metrics)
        self.check_users = store.users is not None
        # Indexed by user id so that a deactivated user's keys can be dropped at once.
        self.positive: OwnerIndexedCache[_CachedIdentity] = OwnerIndexedCache(
            cache_config.max_entries, self._positive_ttu, _owner_of
        )
        self.negative: TTLCache[str, AuthFailureReason] = TTLCache(
            cache_config.negative_max_entries, cache_config.negative_ttl_seconds
        )
        self._pending: dict[str, asyncio.Future[Identity]] = {}
        self._evictions = 0
        self._last_store_failure = -STORE_RETRY_INTERVAL_SECONDS

    async def authenticate(self, key: str, client: str | None = None) -> Identity:
        """Return the identity owning `key`, sent by the client at address `client`.

        Raises `AuthenticationFailed` with the reason when the key does not
        authenticate (a malformed key fails without a store query), and `StoreUnavailable` when the store cannot answer.
        A client that spent its failed lookups gets `THROTTLED` for keys
        that are not cached, without a store query.
        """
        if not is_well_formed_key(key):
            raise AuthenticationFailed(AuthFailureReason.INVALID)
        cache_key = self._hash_with_first_secret(key)

        try:
            # Indexing looks the key up once, where `get` checks for it first.
            cached: _CachedIdentity | None = self.positive[cache_key]
        except KeyError:
            cached = None
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

        limiter = self.failed_lookups
        if client is not None and limiter is not None and not limiter.allows(client):
            raise AuthenticationFailed(AuthFailureReason.THROTTLED)

        self.metrics.cache["miss"].inc()
        try:
            return await self._shared_lookup(key, cache_key)
        except AuthenticationFailed:
            if client is not None and limiter is not None:
                limiter.charge(client)
            raise

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

    def evict_user(self, user_id: str) -> int:
        """Drop every cached identity of the user `user_id`; return how many were dropped.

        NOTE: rejected keys stay in the negative cache, so a key rejected
        while its owner was inactive stays rejected for up to
        `cache.negative_ttl_seconds` after the owner is reactivated.
        """
        self._evictions += 1
        return self.positive.pop_owner(user_id)

    def cache_identity(self, cache_key: str, identity: Identity) -> None:
        """Cache `identity` as the answer for `cache_key`, fresh for `cache.ttl_seconds`."""
        self.positive[cache_key] = _CachedIdentity(identity, time.monotonic() + self.cache_ttl)

    def forget_failure(self, token_hash: str) -> None:
        """Drop the negative answer cached for `token_hash`, as when a token with that hash was just created."""
        self.negative.pop(token_hash, None)

    def clear(self) -> None:
        """Drop every cached result. A lookup in flight still serves its request but caches nothing."""
        self._evictions += 1
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
            if document is None and self.legacy_keys is not None:
                document = await self._migrate_legacy_key(key, hashes, self.legacy_keys)
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
            self.cache_identity(cache_key, identity)
        if document.get("token_hash") != cache_key:
            self.rehasher.schedule(identity.token_id, document["token_hash"], cache_key)
        return identity

    async def _migrate_legacy_key(
        self, key: str, hashes: list[str], legacy_keys: LegacyKeyStore
    ) -> dict[str, Any] | None:
        """Store the token of a legacy key held by exactly one user; return it with its owner, or None.

        A key shared by several users returns None. Raises
        `AuthenticationFailed` when the owner is inactive or deleted, without
        storing anything, and `StoreUnavailable` when the store fails.
        """
        holders = await legacy_keys.find_holders(key)
        if len(holders) != 1:
            if holders:
                logger.warning(
                    "Rejected a legacy key held by several users: %s.", ", ".join(str(h["_id"]) for h in holders)
                )
            return None
        owner = holders[0]
        if not _is_active_owner([owner]):
            self._remember_failure(hashes[0], AuthFailureReason.INACTIVE_USER)

        document = migrated_token(owner["_id"], key, self.secrets[0], datetime.datetime.now(datetime.UTC))
        try:
            token_id = await self.store.insert_token(document)
        except DuplicateKeyError:
            # Another gateway process migrated the key after our lookup, so the stored token decides.
            return await self.store.find_token(hashes)
        logger.info("Migrated the legacy key of user %s to token %s.", owner["_id"], token_id)
        return {**document, "_id": token_id, OWNER_FIELD: [owner]}

    def _failure_reason(self, document: dict[str, Any]) -> AuthFailureReason | None:
        if document.get("revoked_at") is not None:
            return AuthFailureReason.REVOKED
        expires_at = document.get("expires_at")
        if expires_at is not None and not isinstance(expires_at, datetime.datetime):
            # Written by another tool as a string or number: its meaning is a guess, so the key is rejected.
            logger.error(
                "Rejected token %s: its expires_at is a %s, not a date.", document["_id"], type(expires_at).__name__
            )
            return AuthFailureReason.INVALID
        if expires_at is not None and _timestamp(expires_at) <= self.clock():
            return AuthFailureReason.EXPIRED
        if not is_usable_user_id(document.get("user")):
            logger.error("Rejected token %s: its user id is missing or cannot be sent in a header.", document["_id"])
            return AuthFailureReason.INVALID
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


def _owner_of(cached: _CachedIdentity) -> str:
    return cached.identity.user_id


def _identity_from(document: dict[str, Any]) -> Identity:
    expires_at = document.get("expires_at")
    user_agents = document.get("user_agents")
    return Identity(
        user_id=str(document["user"]),
        token_id=document["_id"],
        token_prefix=document.get("token_prefix") or "",
        scopes=tuple(document.get("scopes") or ()),
        expires_at=None if expires_at is None else _timestamp(expires_at),
        user_agents=frozenset(user_agents) if user_agents else NO_USER_AGENTS,
    )


def _timestamp(value: datetime.datetime) -> float:
    # The client is tz_aware, so stored datetimes come back as aware UTC values.
    # A naive value (a client configured otherwise) is UTC by udata's convention.
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()
