"""The trivial apps of the benchmark: an upstream API and a no-op auth_request target.

`app` responds to every request with 200 and a short body. `allow_all`
responds with 200 and an empty body, like the gateway's auth_request
endpoint, which sends no body. nginx's auth_request reads only the status and headers of the
subrequest's response, so a body there would cost it the keepalive
connection. Neither app reads a request body or does any work, so each row of
the table measures the cost of what stands in front of them. The
`x-bench-upstream` header tells a response of `app` from one of the gateway.
"""

from __future__ import annotations

from typing import Any

BODY = b"ok\n"
HEADERS = [
    (b"content-type", b"text/plain"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-bench-upstream", b"1"),
]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
END = {"type": "http.response.body", "body": BODY}
ALLOW_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
ALLOW_END = {"type": "http.response.body", "body": b""}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await send(START)
        await send(END)


async def allow_all(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await send(ALLOW_START)
        await send(ALLOW_END)


async def _lifespan(receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await send({"type": "lifespan.shutdown.complete"})
