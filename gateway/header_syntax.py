"""Reject request headers that HTTP forbids before they reach the upstream.

uvicorn's httptools parser (llhttp) already answers 400 to control
characters, bare CR or LF, obsolete line folding and conflicting framing
headers. uvicorn's h11 parser and other servers let some through: h11 0.16
accepts a value with `\\x01` or DEL, which aiohttp then refuses to send, so
without this check the client would get a 500. The gateway therefore checks
every name and value itself, whatever server runs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# RFC 9110 section 5.1: a field name is a token.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: a field value holds visible characters, spaces, tabs
# and obs-text (0x80-0xFF); any other control character is invalid.
_INVALID_VALUE_CHARACTER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def has_invalid_header(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Tell whether any header has a name that is not a token or a value with a control character."""
    for name, value in headers:
        if _FIELD_NAME.fullmatch(name) is None or _INVALID_VALUE_CHARACTER.search(value) is not None:
            return True
    return False
