"""Raw ASGI responses the gateway sends on its own behalf."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from gateway.errors import AuthFailureReason
from gateway.http_date import current_http_date

Send = Any
JSON_CONTENT_TYPE = (b"content-type", b"application/json")
STORE_UNAVAILABLE_MESSAGE = "Authentication is temporarily unavailable, retry later"


async def send_json(
    send: Send,
    status: int,
    payload: dict[str, Any] | list[Any],
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete JSON response."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    response_headers = [
        JSON_CONTENT_TYPE,
        (b"content-length", str(len(body)).encode()),
        (b"date", current_http_date()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send `{"message": ...}` with `status`: the reference API's error shape."""
    await send_json(send, status, {"message": message}, headers)


def unauthorized_headers(reason: AuthFailureReason, header_name: str) -> list[tuple[bytes, bytes]]:
    """Headers of a 401: a challenge naming the key header, and the machine-readable reason."""
    return challenge_headers(reason.value, header_name)


def challenge_headers(error: str, header_name: str) -> list[tuple[bytes, bytes]]:
    """Headers of a 401 whose machine-readable reason is `error`."""
    challenge = f'ApiKey header="{header_name}", error="{error}"'.encode()
    return [(b"www-authenticate", challenge), (b"x-auth-error", error.encode())]


async def send_websocket_error(send: Send, status: int, message: str) -> None:
    """Reject a WebSocket handshake with `status` and a JSON body.

    Uses the ASGI `websocket.http.response` extension, whose messages are the
    HTTP response messages with a `websocket.` prefix.
    """

    async def send_as_websocket(event: dict[str, Any]) -> None:
        await send({**event, "type": "websocket." + event["type"]})

    await send_error(send_as_websocket, status, message)
