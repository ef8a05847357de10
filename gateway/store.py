"""Access to the `api_token` and `user` collections through pymongo's async client.

Every driver error is translated here into `StoreUnavailable`, so callers
handle one exception and fail closed. The client is `tz_aware`, so every
datetime read back is an aware UTC datetime.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError, PyMongoError

from gateway.config import StoreConfig
from gateway.errors import StoreUnavailable

logger = logging.getLogger(__name__)

# pymongo logs every command and reply at DEBUG, token hashes included. A
# hash is as good as a key for an offline guess, so that logger never goes
# below INFO, whatever level the application sets on the root logger. The
# filter drops those records even when something later sets the logger itself to DEBUG.
_COMMAND_LOGGER = logging.getLogger("pymongo.command")
_COMMAND_LOGGER.setLevel(logging.INFO)
_COMMAND_LOGGER.addFilter(lambda record: record.levelno >= logging.INFO)

MAX_USER_AGENTS = 20
OWNER_FIELD = "owner"

# A user id reaches the upstream as a header value, so it must be one run of
# visible characters. An empty id would read as an empty identity, and a
# header value cannot contain whitespace or control characters.
_USABLE_USER_ID = re.compile(r"[^\x00-\x20\x7f-\x9f\s]+")


class TokenStore:
    """The token and user collections of one MongoDB database."""

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], config: StoreConfig) -> None:
        self.client = client
        self.config = config
        database = client[config.database]
        self.tokens = database[config.tokens_collection]
        self.users = database[config.users_collection] if config.users_collection else None
        self._lookup_owner = self._owner_lookup_stage()

    @classmethod
    def connect(cls, uri: str, config: StoreConfig, event_listeners: Sequence[Any] = ()) -> TokenStore:
        """Create a client for `uri`; the connection itself opens on first use.

        `timeoutMS` bounds every operation, server selection included, so a
        store that is down or hangs costs at most `config.timeout_seconds`.
        """
        timeout_ms = int(config.timeout_seconds * 1000)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            tz_aware=True,
            timeoutMS=timeout_ms,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            event_listeners=list(event_listeners),
            appname="api-key-gateway",
        )
        return cls(client, config)

    async def close(self) -> None:
        await self.client.close()

    async def ping(self) -> None:
        try:
            await self.client.admin.command("ping")
        except PyMongoError as exc:
            raise StoreUnavailable(f"The token store did not respond to a ping: {type(exc).__name__}.") from exc

    async def ensure_indexes(self) -> None:
        """Create udata's indexes on `api_token` when they are missing."""
        try:
            await self.tokens.create_index("token_hash", unique=True)
            await self.tokens.create_index("user")
            await self.tokens.create_index([("user", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)])
        except PyMongoError as exc:
            raise StoreUnavailable(f"Creating the token indexes failed: {type(exc).__name__}.") from exc

    async def find_token(self, token_hashes: Iterable[str]) -> dict[str, Any] | None:
        """Return the token document matching one of `token_hashes`, or None.

        When a users collection is configured, the owner's `active` and
        `deleted` fields come with it under `owner` (a list of at most one
        document), so a lookup costs one round trip.
        """
        pipeline: list[dict[str, Any]] = [
            {"$match": {"token_hash": {"$in": list(token_hashes)}}},
            {"$limit": 1},
        ]
        if self._lookup_owner:
            pipeline.append(self._lookup_owner)
        try:
            cursor = await self.tokens.aggregate(pipeline)
            documents = await cursor.to_list(1)
        except PyMongoError as exc:
            raise StoreUnavailable(f"The token lookup failed: {type(exc).__name__}.") from exc
        return documents[0] if documents else None

    async def insert_token(self, document: dict[str, Any]) -> ObjectId:
        """Insert a token document and return its id.

        Raises `DuplicateKeyError` when the hash exists already, and
        `StoreUnavailable` for any other failure.
        """
        try:
            result = await self.tokens.insert_one(document)
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            raise StoreUnavailable(f"Storing the token failed: {type(exc).__name__}.") from exc
        inserted_id: ObjectId = result.inserted_id
        return inserted_id

    async def list_tokens(self, user: Any) -> list[dict[str, Any]]:
        """Return the tokens of `user` that are not revoked, newest first, without their hashes."""
        query = {"user": user, "revoked_at": None}
        try:
            cursor = self.tokens.find(query, {"token_hash": 0}).sort([("created_at", -1), ("_id", -1)])
            return await cursor.to_list(None)
        except PyMongoError as exc:
            raise StoreUnavailable(f"Listing the tokens failed: {type(exc).__name__}.") from exc

    async def revoke_token(self, token_id: ObjectId, user: Any | None, revoked_at: datetime.datetime) -> bool:
        """Set `revoked_at` on the token unless it is revoked already; return whether this call did it.

        With `user`, only a token of that user matches. The filter requires
        `revoked_at` to be null, so of concurrent calls for one token exactly
        one returns True.
        """
        query: dict[str, Any] = {"_id": token_id, "revoked_at": None}
        if user is not None:
            query["user"] = user
        try:
            result = await self.tokens.update_one(query, {"$set": {"revoked_at": revoked_at}})
        except PyMongoError as exc:
            raise StoreUnavailable(f"Revoking the token failed: {type(exc).__name__}.") from exc
        return result.matched_count == 1

    async def find_token_by_id(self, token_id: ObjectId, user: Any | None = None) -> dict[str, Any] | None:
        """Return the token document with id `token_id` (of `user` when given) without its hash, or None."""
        query: dict[str, Any] = {"_id": token_id}
        if user is not None:
            query["user"] = user
        try:
            return await self.tokens.find_one(query, {"token_hash": 0})
        except PyMongoError as exc:
            raise StoreUnavailable(f"Reading the token failed: {type(exc).__name__}.") from exc

    async def replace_token_hash(self, token_id: Any, old_hash: str, new_hash: str) -> bool:
        """Set the hash of token `token_id` to `new_hash` if it is still `old_hash`; return whether it changed.

        The condition on the old hash makes concurrent rotations by several
        processes safe: one write wins, the others match nothing. Raises
        `DuplicateKeyError` when `new_hash` belongs to another token, and
        `StoreUnavailable` for any other failure.
        """
        try:
            result = await self.tokens.update_one(
                {"_id": token_id, "token_hash": old_hash}, {"$set": {"token_hash": new_hash}}
            )
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            raise StoreUnavailable(f"Re-hashing token {token_id} failed: {type(exc).__name__}.") from exc
        return result.modified_count == 1

    async def record_usage(self, records: Iterable[tuple[Any, datetime.datetime, Iterable[str]]]) -> None:
        """Write usage records `(token_id, last_used_at, user_agents)` in one bulk write.

        `last_used_at` only moves forward (`$max`). A User-Agent is added only
        while fewer than `MAX_USER_AGENTS` are stored, as udata does; the
        condition sits in the filter, so concurrent writers cannot push the
        list past the limit.
        """
        updates: list[Any] = []
        for token_id, last_used_at, user_agents in records:
            updates.append(pymongo.UpdateOne({"_id": token_id}, {"$max": {"last_used_at": last_used_at}}))
            for user_agent in user_agents:
                filter_ = {"_id": token_id, f"user_agents.{MAX_USER_AGENTS - 1}": {"$exists": False}}
                updates.append(pymongo.UpdateOne(filter_, {"$addToSet": {"user_agents": user_agent}}))
        if not updates:
            return
        try:
            await self.tokens.bulk_write(updates, ordered=False)
        except PyMongoError as exc:
            raise StoreUnavailable(f"Recording token usage failed: {type(exc).__name__}.") from exc

    def _owner_lookup_stage(self) -> dict[str, Any] | None:
        if self.users is None:
            return None
        return {
            "$lookup": {
                "from": self.config.users_collection,
                "localField": "user",
                "foreignField": "_id",
                "as": OWNER_FIELD,
                "pipeline": [{"$project": {"active": 1, "deleted": 1}}],
            }
        }


def parse_user_id(text: str) -> ObjectId | str:
    """Return udata's form of a user id: an ObjectId for 24 hex digits, else the string."""
    if len(text) == 24 and ObjectId.is_valid(text):
        return ObjectId(text)
    return text


def is_usable_user_id(value: Any) -> bool:
    """Check whether `value` can name a user in a header: not None, and only visible characters as a string."""
    return value is not None and _USABLE_USER_ID.fullmatch(str(value)) is not None
