"""JSON views of token documents, shared by the management routes and the CLI.

Datetimes are ISO-8601 strings in UTC with milliseconds, BSON's precision.
Token hashes never appear in a view.
"""

from __future__ import annotations

import datetime
from typing import Any

from gateway.token_manager import TOKEN_KIND


def token_metadata(document: dict[str, Any]) -> dict[str, Any]:
    """Return the public fields of a token document as JSON values; never the hash."""
    return {
        "id": str(document["_id"]),
        "name": document.get("name"),
        "token_prefix": document.get("token_prefix") or "",
        "scopes": list(document.get("scopes") or []),
        "kind": document.get("kind") or TOKEN_KIND,
        "created_at": iso(document.get("created_at")),
        "expires_at": iso(document.get("expires_at")),
    }


def listed_token(document: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """Return a token as listed: its metadata, usage, and whether it has expired at `now`."""
    stored_expiry = document.get("expires_at")
    expires_at = utc(stored_expiry)
    # The gateway rejects a token whose expires_at is not a date, so it is listed as expired.
    unreadable_expiry = stored_expiry is not None and expires_at is None
    return {
        **token_metadata(document),
        "last_used_at": iso(document.get("last_used_at")),
        "user_agents": list(document.get("user_agents") or []),
        "expired": unreadable_expiry or (expires_at is not None and expires_at <= now),
    }


def utc(value: Any) -> datetime.datetime | None:
    """Return `value` as an aware UTC datetime, or None when it is not a datetime.

    Other tools may store a string or a number, which has no reliable meaning here.
    """
    if not isinstance(value, datetime.datetime):
        return None
    # The store client is tz_aware; a naive value is UTC by udata's convention.
    if value.tzinfo is not None:
        return value
    return value.replace(tzinfo=datetime.UTC)


def iso(value: Any) -> str | None:
    value = utc(value)
    return None if value is None else value.isoformat(timespec="milliseconds")
