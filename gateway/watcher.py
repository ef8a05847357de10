"""Evict changed tokens and users from the cache as soon as the store reports the change.

A change stream on the token collection reports every update, replacement
and deletion, and the token's cache entries are dropped at once. So a
revocation made through any process, or directly in the database, is
rejected here within the stream's delivery time instead of `cache.ttl_seconds`.
Inserts drop the negative answer cached for the new hash, so a token created
elsewhere works here at once.

A second change stream, on the users collection, drops every cached key of a
user whose `active` or `deleted` field changed, whose document was replaced,
or who was deleted. So a deactivated or deleted user's keys are rejected
within the same delivery time. Inserts and changes to other user fields
(`last_login_at`) leave the cache alone.

Both streams share one follower: when a stream fails, the watcher resumes after the last event it saw,
retrying with exponential backoff; while it is down, the cache TTL bounds
revocations and deactivations. A store without change streams (a MongoDB server that is not a
replica set) is reported once, and the TTL stays the bound.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from gateway.authenticator import Authenticator
from gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

# Server error codes meaning "this deployment has no change streams":
# 40573 (only supported on replica sets), 40324 (unknown pipeline stage),
# 115 (CommandNotSupported).
UNSUPPORTED_CODES = frozenset({40573, 40324, 115})
# Fields the gateway itself writes on every use; a change to them alone
# changes nothing about whether the token authenticates.
USAGE_FIELDS = frozenset({"last_used_at", "user_agents"})
# The user fields that udata's "Inactive user" check reads.
USER_STATUS_FIELDS = frozenset({"active", "deleted"})
# Events on the whole collection: each clears the cache.
COLLECTION_OPERATIONS = ("drop", "rename", "dropDatabase", "invalidate")
DOCUMENT_OPERATIONS = ("update", "replace", "delete")
INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 5.0


class ChangeStreamWatcher:
    """Follow one collection's change stream and apply each change to `authenticator`'s caches.

    Subclasses set `stream` (the metrics label), `operations` (the event
    types to receive) and `subject` (what the log lines call the changes),
    and implement `apply`.
    """

    stream: ClassVar[str]
    operations: ClassVar[tuple[str, ...]]
    subject: ClassVar[str]

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        authenticator: Authenticator,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.collection = collection
        self.authenticator = authenticator
        self.active_gauge = metrics.change_stream_active[self.stream]
        self.lag = metrics.revocation_lag[self.stream]
        self.clock = clock
        self.resume_token: Mapping[str, Any] | None = None
        self.is_supported = True
        self.opened = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.stream}-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: pymongo 4.20 was seen to swallow a cancellation while the server was down.
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_SECONDS)
            self._task = None
        self.active_gauge.set(0)

    async def _run(self) -> None:
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            try:
                await self._follow()
            except OperationFailure as exc:
                if exc.code in UNSUPPORTED_CODES:
                    self._give_up(exc)
                    return
                self._note_failure(exc, backoff)
            except PyMongoError as exc:
                self._note_failure(exc, backoff)
            if self.opened.is_set():
                backoff = INITIAL_BACKOFF_SECONDS
            self.opened.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _follow(self) -> None:
        stream = await self._open()
        self.opened.set()
        self.active_gauge.set(1)
        if self._failures:
            logger.info("The change stream on %s resumed after %d failure(s).", self.collection.name, self._failures)
            self._failures = 0
        try:
            # try_next, not `async for`: pymongo 4.20 bounds a whole `async for`
            # wait by timeoutMS, so an idle stream failed every
            # store.timeout_seconds. Each try_next is one getMore.
            while stream.alive:
                change = await stream.try_next()
                self.resume_token = stream.resume_token
                if change is not None:
                    self.apply(change)
        finally:
            self.active_gauge.set(0)
            await stream.close()

    def _max_await_time_ms(self) -> int | None:
        # A getMore waits up to maxAwaitTimeMS for a change (MongoDB waits 1 s
        # when it is unset), and that wait must end within the client's timeoutMS.
        timeout = self.collection.database.client.options.timeout
        return None if timeout is None else max(1, int(timeout * 1000 / 2))

    async def _open(self) -> Any:
        pipeline = [{"$match": {"operationType": {"$in": list(self.operations)}}}]
        max_await_time_ms = self._max_await_time_ms()
        if self.resume_token is not None:
            try:
                return await self.collection.watch(
                    pipeline, resume_after=self.resume_token, max_await_time_ms=max_await_time_ms
                )
            except OperationFailure as exc:
                if exc.code in UNSUPPORTED_CODES:
                    raise
                # Usually 286 (ChangeStreamHistoryLost): the events since the
                # token are gone, so the stream restarts from now instead.
                logger.warning(
                    "The change stream on %s cannot resume (code %s); it restarts and the key cache is cleared.",
                    self.collection.name,
                    exc.code,
                )
        stream = await self.collection.watch(pipeline, max_await_time_ms=max_await_time_ms)
        # Entries cached before the stream started may have missed a change.
        self.authenticator.clear()
        self.resume_token = stream.resume_token
        logger.info("Watching %s for %s: they evict cached keys at once.", self.collection.name, self.subject)
        return stream

    def apply(self, change: Mapping[str, Any]) -> None:
        """Update the cache for one change event."""
        raise NotImplementedError

    def clear_for(self, operation: str) -> None:
        """Clear the cache for an event on the whole collection (drop, rename, dropDatabase, invalidate)."""
        self.authenticator.clear()
        if operation == "invalidate":
            # An invalidated stream ends and cannot be resumed; the next one starts from now.
            self.resume_token = None
        logger.warning("A %s event on %s cleared the key cache.", operation, self.collection.name)

    def record_lag(self, change: Mapping[str, Any], operation: str, evicted: int) -> None:
        """Observe the time from the change's write to now, and log the eviction if anything was evicted."""
        written_at = _write_time(change)
        if written_at is None:
            return
        # Clocks of the store and the gateway may differ slightly; a negative lag is clock skew.
        lag = max(0.0, self.clock() - written_at)
        self.lag.observe(lag)
        if evicted:
            document_id = change.get("documentKey", {}).get("_id")
            logger.info(
                "Evicted %d cached key(s) %.3f s after the %s of %s document %s.",
                evicted,
                lag,
                operation,
                self.collection.name,
                document_id,
            )

    def _note_failure(self, error: PyMongoError, backoff: float) -> None:
        self._failures += 1
        # The first failure of an outage is a warning; its repeats are debug lines.
        log = logger.warning if self._failures == 1 else logger.debug
        log(
            "The change stream on %s failed (%s); retrying in %.1f s, until then the cache TTL bounds revocations.",
            self.collection.name,
            type(error).__name__,
            backoff,
        )

    def _give_up(self, error: OperationFailure) -> None:
        self.is_supported = False
        self.active_gauge.set(0)
        logger.warning(
            "The store does not support change streams (code %s): %s in %s reach this process "
            "within cache.ttl_seconds.",
            error.code,
            self.subject,
            self.collection.name,
        )


class RevocationWatcher(ChangeStreamWatcher):
    """Follow the token collection's change stream and evict changed tokens from the cache."""

    stream = "tokens"
    operations = ("insert", *DOCUMENT_OPERATIONS, *COLLECTION_OPERATIONS)
    subject = "token changes"

    def apply(self, change: Mapping[str, Any]) -> None:
        """Update the cache for one change event."""
        operation = change.get("operationType")
        if operation == "insert":
            token_hash = (change.get("fullDocument") or {}).get("token_hash")
            if isinstance(token_hash, str):
                self.authenticator.forget_failure(token_hash)
            return
        if operation in DOCUMENT_OPERATIONS:
            if operation == "update" and _touches_usage_only(change.get("updateDescription") or {}):
                return
            token_id = change.get("documentKey", {}).get("_id")
            self.record_lag(change, operation, self.authenticator.evict_token(token_id))
            return
        self.clear_for(str(operation))


class UserWatcher(ChangeStreamWatcher):
    """Follow the users collection's change stream and evict the keys of users who may have become inactive."""

    stream = "users"
    operations = (*DOCUMENT_OPERATIONS, *COLLECTION_OPERATIONS)
    subject = "user deactivations"

    def apply(self, change: Mapping[str, Any]) -> None:
        """Update the cache for one change event."""
        operation = change.get("operationType")
        if operation in DOCUMENT_OPERATIONS:
            if operation == "update" and not _may_change_status(change.get("updateDescription") or {}):
                return
            user_id = change.get("documentKey", {}).get("_id")
            # Identities carry the user id as the text sent upstream (24 hex digits for an ObjectId).
            self.record_lag(change, operation, self.authenticator.evict_user(str(user_id)))
            return
        self.clear_for(str(operation))


def _changed_fields(description: Mapping[str, Any]) -> list[str]:
    # Top-level names: $addToSet on user_agents is reported as "user_agents.3".
    updated = description.get("updatedFields") or {}
    removed = description.get("removedFields") or []
    return [field.split(".", 1)[0] for field in [*updated, *removed]]


def _touches_usage_only(description: Mapping[str, Any]) -> bool:
    fields = _changed_fields(description)
    return bool(fields) and all(field in USAGE_FIELDS for field in fields)


def _may_change_status(description: Mapping[str, Any]) -> bool:
    # An update without a description is taken as a real change.
    fields = _changed_fields(description)
    return not fields or any(field in USER_STATUS_FIELDS for field in fields)


def _write_time(change: Mapping[str, Any]) -> float | None:
    # wallTime (MongoDB 6.0+ and SecantusDB) has milliseconds; clusterTime has whole seconds.
    wall_time = change.get("wallTime")
    if isinstance(wall_time, datetime.datetime):
        if wall_time.tzinfo is None:
            wall_time = wall_time.replace(tzinfo=datetime.UTC)
        return wall_time.timestamp()
    cluster_time = change.get("clusterTime")
    return float(cluster_time.time) if cluster_time is not None else None
