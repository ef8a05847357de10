"""The `Date` header value, formatted once per second.

The gateway runs its server with the server's own `Date` header turned off,
because a forwarded response already carries the upstream's: keeping both
would send two `Date` lines. The gateway adds this value to the responses it
writes itself and to forwarded responses that have none (RFC 9110 section
6.6.1 requires a proxy to add one).
"""

from __future__ import annotations

import email.utils
import time

_cached_second = 0
_cached_value = b""


def current_http_date() -> bytes:
    """Return the current time as an IMF-fixdate, such as `Sun, 06 Nov 1994 08:49:37 GMT`."""
    global _cached_second, _cached_value

    now = time.time()
    second = int(now)
    if second != _cached_second:
        _cached_value = email.utils.formatdate(now, usegmt=True).encode()
        _cached_second = second
    return _cached_value
