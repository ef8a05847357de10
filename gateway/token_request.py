"""Read and validate the JSON body of a token-creation request.

`read_body` reads the ASGI body incrementally and stops at `MAX_BODY_BYTES`,
so a client cannot make the gateway hold more than that. `parse_create_request`
checks every field and reports every problem at once, each naming its field.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import unicodedata
from collections.abc import Collection
from typing import Any

from gateway.errors import ClientDisconnected, InvalidRequestBody
from gateway.token_manager import MAX_NAME_LENGTH

MAX_BODY_BYTES = 16 * 1024
CREATE_FIELDS = ("name", "expires_at", "scopes")

Receive = Any

# Unicode categories a token name must not contain: control characters (C0,
# DEL, C1), line and paragraph separators, and lone surrogates, which JSON
# can encode as \ud800 but UTF-8 and BSON cannot store.
_FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """The validated fields of a creation request; `scopes` is None when the client sent none."""

    name: str | None
    expires_at: datetime.datetime | None
    scopes: tuple[str, ...] | None


async def read_body(receive: Receive, declared_length: int | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """Return the request body, reading it chunk by chunk.

    Raises `InvalidRequestBody` (413) as soon as `declared_length` or the bytes
    received pass `limit`, before reading the rest, and `ClientDisconnected`.
    """
    if declared_length is not None and declared_length > limit:
        raise _too_large(limit)

    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client disconnected before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_create_request(body: bytes, allowed_scopes: Collection[str], now: datetime.datetime) -> CreateRequest:
    """Validate a creation body; an empty body means every field takes its default.

    Raises `InvalidRequestBody` (400) naming every invalid field.
    """
    fields = _decode_object(body) if body.strip() else {}

    # Unknown names are cut, so a client cannot make the error list as large as its body.
    errors = {name[:64]: "is not a known field" for name in fields if name not in CREATE_FIELDS}
    name = _checked(errors, "name", parse_token_name, fields.get("name"))
    expires_at = _checked(errors, "expires_at", _parse_expiry, fields.get("expires_at"), now)
    scopes = _checked(errors, "scopes", _parse_scopes, fields.get("scopes"), allowed_scopes)

    if errors:
        summary = "; ".join(f"{field} {problem}" for field, problem in errors.items())
        raise InvalidRequestBody(400, f"Invalid request body: {summary}.", errors)
    return CreateRequest(name, expires_at, scopes)


def _decode_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise InvalidRequestBody(400, "Invalid request body: it is not UTF-8 text.") from None
    except RecursionError:
        raise InvalidRequestBody(400, "Invalid request body: the JSON is nested too deeply.") from None
    except ValueError as exc:
        raise InvalidRequestBody(400, f"Invalid request body: it is not valid JSON ({exc}).") from None

    if not isinstance(value, dict):
        raise InvalidRequestBody(400, f"Invalid request body: expected a JSON object, got {_json_type(value)}.")
    return value


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:64]!r} appears more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _checked(errors: dict[str, str], field: str, parse: Any, *arguments: Any) -> Any:
    try:
        return parse(*arguments)
    except ValueError as exc:
        errors[field] = str(exc)
        return None


def parse_token_name(value: Any) -> str | None:
    """Return a valid token name or None; raise `ValueError` naming the rule it breaks."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be a string or null, got {_json_type(value)}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    forbidden = next((c for c in value if unicodedata.category(c) in _FORBIDDEN_NAME_CATEGORIES), None)
    if forbidden is not None:
        raise ValueError(f"must not contain control characters, found U+{ord(forbidden):04X}")
    return value


def _parse_expiry(value: Any, now: datetime.datetime) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO-8601 date and time string or null, got {_json_type(value)}")
    expires_at = parse_iso_datetime(value)
    if expires_at <= now:
        raise ValueError("must be in the future")
    return expires_at


def parse_iso_datetime(text: str) -> datetime.datetime:
    """Return `text` as an aware UTC datetime truncated to milliseconds, BSON's precision.

    A value without an offset is UTC. Raises `ValueError` for anything that is
    not ISO-8601, for offsets that are not whole minutes, and for instants
    outside the years 1 to 9999 once converted to UTC.
    """
    try:
        # RFC 3339 allows a lowercase "t" and "z", which fromisoformat rejects.
        # Non-ASCII text is rejected first, so upper() cannot turn a letter
        # such as U+017F (long s, whose uppercase is "S") into an ASCII one.
        if not text.isascii():
            raise ValueError(text)
        value = datetime.datetime.fromisoformat(text.upper())
    except ValueError:
        raise ValueError(f"must be an ISO-8601 date and time, got {text[:64]!r}") from None

    offset = value.utcoffset()
    if offset is None:
        value = value.replace(tzinfo=datetime.UTC)
    elif offset % datetime.timedelta(minutes=1):
        raise ValueError(f"must have an offset in whole minutes, got {text[:64]!r}")
    try:
        value = value.astimezone(datetime.UTC)
    except OverflowError:
        raise ValueError(f"is outside the years 1 to 9999 in UTC, got {text[:64]!r}") from None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _parse_scopes(value: Any, allowed_scopes: Collection[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"must be a list of strings or null, got {_json_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"must be a list of strings, but item {index} is {_json_type(item)}")
    if not value:
        raise ValueError("must contain at least one scope")
    unknown = [item for item in value if item not in allowed_scopes]
    if unknown:
        allowed = ", ".join(allowed_scopes)
        shown = ", ".join(repr(item[:64]) for item in unknown[:5])
        raise ValueError(f"contains {shown}, which is not allowed: allowed scopes are {allowed}")
    return tuple(dict.fromkeys(value))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _too_large(limit: int) -> InvalidRequestBody:
    return InvalidRequestBody(413, f"The request body is larger than {limit} bytes.")
