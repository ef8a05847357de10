"""A gateway shared by many tests of one module: for hypothesis and long tables of cases."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import monitoring

from gateway.app import GatewayApp
from gateway.coalescing import CoalescingHttpToolsProtocol
from gateway.config import load_config
from gateway.tokens import display_prefix, generate_token, hash_token
from tests.support.servers import ThreadedServer
from tests.support.upstream import EchoUpstream

SHARED_SECRET = "shared-secret-0123456789-abcdefghij"


class LookupCounter(monitoring.CommandListener):
    """Count token lookups (`aggregate` or `find` on `api_token`) sent to the store."""

    def __init__(self) -> None:
        self.lookups = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("aggregate", "find") and event.command.get(event.command_name) == "api_token":
            self.lookups += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclasses.dataclass
class SharedGateway:
    server: ThreadedServer
    app: GatewayApp
    upstream: EchoUpstream
    plaintext: str
    user_id: ObjectId
    lookups: LookupCounter

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.contextmanager
def shared_gateway(mongodb_uri: str, http: str = "httptools", **environ: str) -> Iterator[SharedGateway]:
    """Start an echo upstream and a gateway on a fresh database holding one valid token."""
    database_name = f"gateway_test_{uuid.uuid4().hex[:12]}"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongodb_uri, tz_aware=True)
    user = ObjectId()
    plaintext = generate_token("udata_")
    client[database_name].user.insert_one({"_id": user, "active": True, "deleted": None})
    client[database_name].api_token.insert_one(
        {
            "token_hash": hash_token(SHARED_SECRET, plaintext),
            "token_prefix": display_prefix(plaintext, "udata_"),
            "user": user,
            "scopes": ["admin"],
            "kind": "api_key",
            "revoked_at": None,
            "expires_at": None,
        }
    )
    upstream = EchoUpstream()
    upstream_server = ThreadedServer(upstream).start()
    values = {
        "GATEWAY_TOKENS_SECRET": SHARED_SECRET,
        "GATEWAY_STORE_URI": mongodb_uri,
        "GATEWAY_STORE_DATABASE": database_name,
        "GATEWAY_UPSTREAM_URL": upstream_server.url,
        **{f"GATEWAY_{name.upper()}": value for name, value in environ.items()},
    }
    lookups = LookupCounter()
    app = GatewayApp(load_config(None, values), event_listeners=[lookups])
    # As in production, the gateway's httptools protocol writes through gateway.coalescing.
    protocol = CoalescingHttpToolsProtocol if http == "httptools" else http
    server = ThreadedServer(app, http=protocol).start()
    try:
        yield SharedGateway(server, app, upstream, plaintext, user, lookups)
    finally:
        server.stop()
        upstream_server.stop()
        client.drop_database(database_name)
        client.close()
