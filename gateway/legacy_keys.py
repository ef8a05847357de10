"""Plaintext keys of the old system: one string field per user document.

Before its 2026 migration, udata kept each user's single API key in plain
text in the `apikey` field of the `user` collection. The migration command
and the authenticator's fallback both read that field through
`LegacyKeyStore` and turn a key into a token with `migrated_token`, so a key
migrated by either ends up as the same document.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncGenerator
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from gateway.errors import StoreUnavailable
from gateway.token_manager import DEFAULT_SCOPES, TOKEN_KIND
from gateway.tokens import display_prefix, hash_token

MIGRATED_TOKEN_NAME = "Migrated API key"
# A key held by this many users or more is ambiguous and never accepted.
SHARED_KEY_HOLDERS = 2

UserDocument = dict[str, Any]


def migrated_token(user_id: Any, key: str, secret: str, now: datetime.datetime) -> dict[str, Any]:
    """Return the `api_token` document udata's migration creates for a legacy `key` of `user_id`.

    The display prefix is the key's first eight characters, or empty when the
    key is shorter: legacy keys never carry the configured token prefix.
    """
    return {
        "token_hash": hash_token(secret, key),
        "token_prefix": display_prefix(key, ""),
        "user": user_id,
        "name": MIGRATED_TOKEN_NAME,
        "scopes": list(DEFAULT_SCOPES),
        "kind": TOKEN_KIND,
        "created_at": now,
        "last_used_at": None,
        "user_agents": [],
        "revoked_at": None,
        "expires_at": None,
    }


class LegacyKeyStore:
    """The legacy key field of a users collection.

    Every driver error is translated into `StoreUnavailable`. Messages name
    users by id and never contain a key.
    """

    def __init__(self, users: AsyncCollection[UserDocument], field: str) -> None:
        self.users = users
        self.field = field

    @classmethod
    def open(cls, client: AsyncMongoClient[UserDocument], database: str, collection: str, field: str) -> LegacyKeyStore:
        return cls(client[database][collection], field)

    async def ensure_index(self) -> None:
        """Index the legacy field, so a lookup by key reads one entry instead of every user.

        Sparse: users without the field stay out of the index.
        """
        try:
            await self.users.create_index(self.field, sparse=True)
        except PyMongoError as exc:
            raise StoreUnavailable(
                f"Indexing the legacy key field {self.field!r} failed: {type(exc).__name__}."
            ) from exc

    async def find_holders(self, key: str) -> list[UserDocument]:
        """Return the users whose legacy field is `key`, at most `SHARED_KEY_HOLDERS` of them.

        Each document carries `_id`, `active` and `deleted`. Two results mean
        the key is shared and must not authenticate anyone.
        """
        projection = {self.field: 1, "active": 1, "deleted": 1}
        try:
            cursor = self.users.find({self.field: key}, projection, limit=SHARED_KEY_HOLDERS)
            holders = await cursor.to_list(SHARED_KEY_HOLDERS)
        except PyMongoError as exc:
            raise StoreUnavailable(f"The legacy key lookup failed: {type(exc).__name__}.") from exc

        # A query on an array field also matches one of its elements; only a
        # string equal to the key is a legacy key.
        if len(holders) == 1 and holders[0].get(self.field) != key:
            return []
        return [{name: value for name, value in holder.items() if name != self.field} for holder in holders]

    async def scan(self, batch_size: int) -> AsyncGenerator[list[tuple[Any, Any]], None]:
        """Yield `(user_id, legacy value)` pairs of every user with the field, `batch_size` at a time, by id.

        The value is whatever the document holds: a string, None or another type.
        """
        batch: list[tuple[Any, Any]] = []
        try:
            cursor = self.users.find({self.field: {"$exists": True}}, {self.field: 1}, batch_size=batch_size)
            async for user in cursor.sort("_id", 1):
                batch.append((user["_id"], user.get(self.field)))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        except PyMongoError as exc:
            raise StoreUnavailable(f"Reading the users' legacy keys failed: {type(exc).__name__}.") from exc
        if batch:
            yield batch

    async def remove_key(self, user_id: Any, key: str) -> bool:
        """Remove the legacy field of `user_id` if it still contains `key`; return whether it did.

        The filter matches the key as well as the user, so a key changed since
        it was read is kept and the change is not lost.
        """
        try:
            result = await self.users.update_one({"_id": user_id, self.field: key}, {"$unset": {self.field: ""}})
        except PyMongoError as exc:
            raise StoreUnavailable(f"Removing the legacy key of user {user_id} failed: {type(exc).__name__}.") from exc
        return result.modified_count == 1
