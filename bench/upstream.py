"""The trivial upstream API of the benchmark: answers every request with 200 and a short body.

It reads no body and does no work, so each row of the table measures the
cost of what stands in front of it. The `x-bench-upstream` response header
lets the benchmark tell an answer of this app from one of the gateway.
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


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        await send(START)
        await send(END)
