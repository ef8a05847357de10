"""The gateway's exception tree.

    GatewayError
    ├── ConfigError             configuration invalid; carries every problem found
    ├── StoreUnavailable        the token store did not answer in time
    ├── AuthenticationFailed    a key did not authenticate; carries the reason
    ├── InvalidRequestBody      a management request body is too large or invalid
    ├── ClientDisconnected      the client left before sending its whole body
    └── UpstreamError
        ├── UpstreamUnreachable connection refused, reset or DNS failure
        └── UpstreamTimeout     connect, pool or read timeout

Messages never contain a key, a token hash or a secret.
"""

from __future__ import annotations

import enum


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid.

    `problems` lists every problem found, one sentence each, so that an
    operator fixes them all in one pass.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class StoreUnavailable(GatewayError):
    """The token store could not be reached or did not answer in time."""


class AuthFailureReason(enum.Enum):
    """Why a key did not authenticate: the closed set of audit outcomes.

    The value is the machine-readable reason; `message` is the text clients
    see, identical to the reference API's messages.
    """

    INVALID = "invalid"
    REVOKED = "revoked"
    EXPIRED = "expired"
    INACTIVE_USER = "inactive_user"
    MISSING = "missing"
    # The client spent its failed store lookups (see gateway.limiter).
    THROTTLED = "throttled"

    @property
    def message(self) -> str:
        return _FAILURE_MESSAGES[self]


_FAILURE_MESSAGES = {
    AuthFailureReason.INVALID: "Invalid API token",
    AuthFailureReason.REVOKED: "Revoked API token",
    AuthFailureReason.EXPIRED: "Expired API token",
    AuthFailureReason.INACTIVE_USER: "Inactive user",
    AuthFailureReason.MISSING: "API token required",
    # The same text as an unknown key: a throttled client learns nothing new
    # about the key it sent.
    AuthFailureReason.THROTTLED: "Invalid API token",
}


class AuthenticationFailed(GatewayError):
    """A key was presented and did not authenticate."""

    def __init__(self, reason: AuthFailureReason) -> None:
        self.reason = reason
        super().__init__(reason.message)


class InvalidRequestBody(GatewayError):
    """A request body the gateway reads itself cannot be used.

    `status` is the HTTP status of the response (400 or 413). `errors` maps each
    invalid field to its problem; it is empty when the body as a whole is at
    fault (too large, not JSON, not an object).
    """

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        self.status = status
        self.errors = errors or {}
        super().__init__(message)


class ClientDisconnected(GatewayError):
    """The client closed the connection before sending its whole body or before the response ended."""


class UpstreamError(GatewayError):
    """The upstream API could not serve the request."""


class UpstreamUnreachable(UpstreamError):
    """The upstream refused or dropped the connection."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer within the configured timeout."""
