"""The audit log: one line per authentication decision, from a closed set of outcomes.

Lines go to the `gateway.audit` logger, apart from the access log, so that
operators can keep, ship or alert on them separately. A line names the
outcome, the request id, and the client, method and path as trusted proxies
report them. When a key authenticated, it also names the user, the token id
and the display prefix. It never contains the key or its hash.
"""

from __future__ import annotations

import enum
import logging

from gateway.access_log import printable
from gateway.authenticator import Identity
from gateway.errors import AuthFailureReason

audit_logger = logging.getLogger("gateway.audit")


class AuditOutcome(enum.Enum):
    """Every outcome an audit line can carry: success, each failure reason, a scope refusal, a store failure."""

    SUCCESS = "success"
    INVALID = AuthFailureReason.INVALID.value
    REVOKED = AuthFailureReason.REVOKED.value
    EXPIRED = AuthFailureReason.EXPIRED.value
    INACTIVE_USER = AuthFailureReason.INACTIVE_USER.value
    MISSING = AuthFailureReason.MISSING.value
    THROTTLED = AuthFailureReason.THROTTLED.value
    FORBIDDEN = "forbidden"
    STORE_UNAVAILABLE = "store_unavailable"


class AuditLog:
    """Write audit lines when `is_enabled`; `[logging] audit_log` turns them off."""

    def __init__(self, is_enabled: bool) -> None:
        self.is_enabled = is_enabled

    def is_writing(self) -> bool:
        """Tell whether `write` writes lines: the audit log is on and its logger takes INFO."""
        return self.is_enabled and audit_logger.isEnabledFor(logging.INFO)

    def write(
        self,
        outcome: AuditOutcome,
        request_id: bytes,
        described: tuple[str, str, str],
        identity: Identity | None = None,
    ) -> None:
        """Write one line; `described` is the client address, method and path of the request."""
        if not self.is_writing():
            return
        client, method, path = described
        fields = {
            "outcome": outcome.value,
            "request_id": request_id.decode("ascii"),
            "client": client,
            "method": printable(method),
            "path": printable(path),
            "user_id": identity.user_id if identity else None,
            "token_id": str(identity.token_id) if identity else None,
            "token_prefix": identity.token_prefix if identity else None,
        }
        if identity is None:
            audit_logger.info(
                "Authentication failed: request_id=%s reason=%s client=%s method=%s path=%s",
                fields["request_id"],
                fields["outcome"],
                fields["client"],
                fields["method"],
                fields["path"],
                extra=fields,
            )
            return
        audit_logger.info(
            _IDENTIFIED_TEMPLATES[outcome],
            fields["request_id"],
            fields["user_id"],
            fields["token_id"],
            fields["token_prefix"] or "-",
            fields["client"],
            fields["method"],
            fields["path"],
            extra=fields,
        )


_IDENTIFIED_TEMPLATES = {
    AuditOutcome.SUCCESS: (
        "Authentication succeeded: request_id=%s user=%s token=%s prefix=%s client=%s method=%s path=%s"
    ),
    AuditOutcome.FORBIDDEN: (
        "Access denied: request_id=%s reason=scope user=%s token=%s prefix=%s client=%s method=%s path=%s"
    ),
}
