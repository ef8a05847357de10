"""The access rule applied after authentication: `auth.required_scopes`.

Scopes are the strings in a token's `scopes` field; udata gives every token
`["admin"]` today. With `required_scopes` set, a key that authenticates but
has none of those scopes is rejected with 403 in both modes. Requests
without a key are governed by `auth.require_key` alone, because they carry
no scope to check.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from gateway.authenticator import Identity

FORBIDDEN_MESSAGE = "API token lacks a required scope"


class Refusal(enum.Enum):
    """The marker `GatewayApp.admit` returns for a request it refused and answered already."""

    REFUSED = "refused"


REFUSED = Refusal.REFUSED


class AccessPolicy:
    """Decide whether an identity may make a request. An empty scope list allows every key."""

    def __init__(self, required_scopes: Iterable[str]) -> None:
        self.required_scopes = frozenset(required_scopes)

    def allows(self, identity: Identity | None) -> bool:
        if identity is None or not self.required_scopes:
            return True
        return not self.required_scopes.isdisjoint(identity.scopes)
