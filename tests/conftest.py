"""Shared fixtures: a real MongoDB-wire store, real upstreams and a real gateway on loopback.

The store is SecantusDB started on a free port for the session, or the
MongoDB server named by GATEWAY_TEST_MONGODB_URI. Each test gets its own
database, so tests never see each other's tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
from bson import ObjectId
from pymongo import monitoring

from gateway.app import GatewayApp
from gateway.coalescing import CoalescingHttpToolsProtocol
from gateway.config import Config, load_config
from gateway.embedded import EmbeddedStore, free_port
from gateway.tokens import display_prefix, generate_token, hash_token
from tests.support.cli import REPOSITORY_ROOT
from tests.support.serve import wait_until_healthy
from tests.support.servers import ThreadedServer
from tests.support.upstream import EchoUpstream

TEST_SECRET = "test-secret-0123456789-abcdefghij"
TEST_MONGODB_URI_VARIABLE = "GATEWAY_TEST_MONGODB_URI"


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri = os.environ.get(TEST_MONGODB_URI_VARIABLE)
    if uri:
        yield uri
        return
    store = EmbeddedStore(tmp_path_factory.mktemp("store"))
    store.start()
    yield store.uri
    store.stop()


@pytest.fixture
def database_name() -> str:
    return f"gateway_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mongo(mongodb_uri: str, database_name: str) -> Iterator[pymongo.database.Database[dict[str, Any]]]:
    """A synchronous handle on the test's database, for seeding and checking documents."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongodb_uri, tz_aware=True, timeoutMS=10_000)
    database = client[database_name]
    database.api_token.create_index("token_hash", unique=True)
    yield database
    client.drop_database(database_name)
    client.close()


@pytest.fixture
def make_config(mongodb_uri: str, database_name: str) -> Callable[..., Config]:
    """Build a valid configuration for the test's database; keyword `section__key=value` overrides."""

    def make(upstream_url: str = "", environ: dict[str, str] | None = None, **overrides: Any) -> Config:
        values = {
            "GATEWAY_TOKENS_SECRET": TEST_SECRET,
            "GATEWAY_STORE_URI": mongodb_uri,
            "GATEWAY_STORE_DATABASE": database_name,
            "GATEWAY_UPSTREAM_URL": upstream_url,
            **(environ or {}),
        }
        config = load_config(None, values)
        for name, value in overrides.items():
            section, key = name.split("__")
            updated = dataclasses.replace(getattr(config, section), **{key: value})
            config = dataclasses.replace(config, **{section: updated})
        return config

    return make


class CommandCounter(monitoring.CommandListener):
    """Count the commands sent to the store, by command name."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        if _opens_change_stream(event.command):
            return
        self.commands.append((event.command_name, collection if isinstance(collection, str) else ""))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def token_lookups(self) -> int:
        return sum(
            1 for name, collection in self.commands if name in ("aggregate", "find") and collection == "api_token"
        )


def _opens_change_stream(command: Any) -> bool:
    pipeline = command.get("pipeline") if command.get("aggregate") is not None else None
    return bool(pipeline) and "$changeStream" in pipeline[0]


@dataclasses.dataclass
class RunningGateway:
    app: GatewayApp
    server: ThreadedServer
    counter: CommandCounter

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
def start_gateway() -> Iterator[Callable[[Config], RunningGateway]]:
    """Start a gateway under uvicorn on a free loopback port; stopped after the test."""
    started: list[RunningGateway] = []

    def start(config: Config, **server_options: Any) -> RunningGateway:
        counter = CommandCounter()
        app = GatewayApp(config, event_listeners=[counter])
        # As in production: uvicorn's httptools protocol writing through gateway.coalescing.
        server_options.setdefault("http", CoalescingHttpToolsProtocol)
        server = ThreadedServer(app, **server_options).start()
        gateway = RunningGateway(app, server, counter)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.server.stop()


@pytest.fixture
def echo_upstream() -> Iterator[tuple[EchoUpstream, ThreadedServer]]:
    app = EchoUpstream()
    server = ThreadedServer(app).start()
    yield app, server
    server.stop()


@pytest.fixture
def seed_user(mongo: Any) -> Callable[..., ObjectId]:
    def seed(active: bool = True, deleted: datetime.datetime | None = None) -> ObjectId:
        user_id = ObjectId()
        mongo.user.insert_one({"_id": user_id, "active": active, "deleted": deleted})
        return user_id

    return seed


@pytest.fixture
def seed_token(mongo: Any) -> Callable[..., tuple[str, dict[str, Any]]]:
    """Insert a token the way udata does, hashing it independently of the gateway's code."""
    import hashlib
    import hmac

    def seed(
        user: Any, secret: str = TEST_SECRET, plaintext: str | None = None, **fields: Any
    ) -> tuple[str, dict[str, Any]]:
        plaintext = plaintext or generate_token("udata_")
        document = {
            "token_hash": hmac.new(secret.encode(), plaintext.encode(), hashlib.sha256).hexdigest(),
            "token_prefix": display_prefix(plaintext, "udata_"),
            "user": user,
            "name": "seeded",
            "scopes": ["admin"],
            "kind": "api_key",
            "created_at": datetime.datetime.now(datetime.UTC),
            "last_used_at": None,
            "user_agents": [],
            "revoked_at": None,
            "expires_at": None,
            **fields,
        }
        document["_id"] = mongo.api_token.insert_one(document).inserted_id
        return plaintext, document

    return seed


__all__ = ["CommandCounter", "RunningGateway", "hash_token"]


@pytest.fixture
def serve_gateway(mongodb_uri: str, database_name: str) -> Iterator[Callable[[str, str], int]]:
    """Run `python -m gateway serve` with `server.server` set; return the port it listens on."""
    processes: list[subprocess.Popen[str]] = []

    def serve(server: str, upstream_url: str) -> int:
        port = free_port()
        environment = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
        environment |= {
            "PYTHONPATH": str(REPOSITORY_ROOT),
            "GATEWAY_SERVER_SERVER": server,
            "GATEWAY_TOKENS_SECRET": TEST_SECRET,
            "GATEWAY_STORE_URI": mongodb_uri,
            "GATEWAY_STORE_DATABASE": database_name,
            "GATEWAY_UPSTREAM_URL": upstream_url,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        return port

    yield serve
    for process in processes:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
