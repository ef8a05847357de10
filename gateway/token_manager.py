"""Create, list and revoke tokens: the rules shared by the HTTP routes and the CLI."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Sequence
from typing import Any

from bson import ObjectId

from gateway.config import TokensConfig
from gateway.store import TokenStore
from gateway.tokens import display_prefix, generate_token, hash_token

TOKEN_KIND = "api_key"
DEFAULT_SCOPES = ("admin",)
MAX_NAME_LENGTH = 255


class RevokeOutcome(enum.Enum):
    """Outcome of a revocation: the token revoked now, revoked before, or no such token."""

    REVOKED = "revoked"
    ALREADY_REVOKED = "already_revoked"
    NOT_FOUND = "not_found"


@dataclasses.dataclass(frozen=True)
class Revocation:
    """The result of `TokenManager.revoke`; `document` is None when no token matched."""

    outcome: RevokeOutcome
    document: dict[str, Any] | None


class TokenManager:
    """Token operations on one store, with the deployment's token settings."""

    def __init__(self, store: TokenStore, config: TokensConfig) -> None:
        self.store = store
        self.config = config

    async def create(
        self,
        user: ObjectId | str,
        name: str | None = None,
        expires_at: datetime.datetime | None = None,
        scopes: Sequence[str] = DEFAULT_SCOPES,
    ) -> tuple[str, dict[str, Any]]:
        """Store a new token for `user`; return its plaintext and its document.

        The plaintext exists only in the return value: the store keeps the
        HMAC hash under the first configured secret. Raises `StoreUnavailable`.
        """
        plaintext = generate_token(self.config.prefix)
        document: dict[str, Any] = {
            "token_hash": hash_token(self.config.secret[0], plaintext),
            "token_prefix": display_prefix(plaintext, self.config.prefix),
            "user": user,
            "name": name,
            "scopes": list(scopes),
            "kind": TOKEN_KIND,
            # BSON datetimes hold milliseconds; truncating here makes the
            # returned document equal to what a later read returns.
            "created_at": _utc_now_milliseconds(),
            "last_used_at": None,
            "user_agents": [],
            "revoked_at": None,
            "expires_at": expires_at,
        }
        document["_id"] = await self.store.insert_token(document)
        return plaintext, document

    async def list(self, user: ObjectId | str) -> list[dict[str, Any]]:
        """Return the tokens of `user` that are not revoked, newest first, without hashes.

        Raises `StoreUnavailable`.
        """
        return await self.store.list_tokens(user)

    async def revoke(self, token_id: ObjectId, user: ObjectId | str | None = None) -> Revocation:
        """Revoke the token `token_id`, keeping its document for audit.

        With `user`, a token of any other user counts as not found, so a
        caller cannot tell whether someone else's token exists. Of concurrent
        revocations of one token, exactly one gets `REVOKED`. Raises
        `StoreUnavailable`.
        """
        if await self.store.revoke_token(token_id, user, _utc_now_milliseconds()):
            return Revocation(RevokeOutcome.REVOKED, await self.store.find_token_by_id(token_id))

        document = await self.store.find_token_by_id(token_id, user)
        if document is None:
            return Revocation(RevokeOutcome.NOT_FOUND, None)
        return Revocation(RevokeOutcome.ALREADY_REVOKED, document)


def _utc_now_milliseconds() -> datetime.datetime:
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
