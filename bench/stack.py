"""The benchmark's servers on loopback: store, upstream, gateways and nginx, with seeded tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
from bson import ObjectId

from bench.nginx import AuthTarget, start_nginx
from bench.processes import REPOSITORY, Server, free_port, start_python
from bench.store_relay import StoreRelay, relayed_uri
from gateway.embedded import EmbeddedStore
from gateway.tokens import display_prefix, generate_token, hash_token

SECRET = "bench-secret-0123456789-abcdefghij"
DATABASE = "udata"
USERS = 100
# Long enough that no warm entry expires during a run, so the warm rows show
# the cache alone. The default of 10 s costs one store query per key every 10 s.
CACHE_TTL_SECONDS = 600
# The positive cache must hold every key the run sends.
CACHE_MAX_ENTRIES = 100_000
SERVERS = ("uvicorn", "granian")

GATEWAY_CONFIG = """\
[server]
server = "{server}"

[upstream]
url = "{upstream_url}"

[tokens]
secret = "{secret}"

[cache]
ttl_seconds = {ttl}
max_entries = {max_entries}

[store]
uri = "{store_uri}"
database = "{database}"

[logging]
level = "warning"
"""


@dataclasses.dataclass
class Stack:
    """The running servers: `gateways` and `nginx_ports` are keyed by server name."""

    directory: Path
    store_uri: str
    store_relay: StoreRelay
    upstream: Server
    noop_auth: Server
    gateways: dict[str, Server]
    nginx: Server
    nginx_ports: dict[str, int]
    warm_key: str

    def url(self, port: int, path: str = "/") -> str:
        return f"http://127.0.0.1:{port}{path}"


@contextlib.contextmanager
def running_stack(directory: Path, cold_pool_sizes: dict[str, int], auth_path: str) -> Iterator[Stack]:
    """Start every server, seed the tokens and write each cold pool to `<directory>/<name>.keys`.

    Stops everything on exit, in reverse order.
    """
    with contextlib.ExitStack() as stop:
        store = EmbeddedStore(directory / "store")
        store_uri = store.start()
        stop.callback(store.stop)
        warm_key = seed_tokens(store_uri, directory, cold_pool_sizes)
        # The gateways reach the store through the relay, which counts their lookups.
        relay = StoreRelay(int(store_uri.split(":")[2].split("/")[0])).start()
        stop.callback(relay.stop)

        upstream = _start_upstream(directory, "upstream", "bench.upstream:app")
        stop.callback(upstream.stop)
        # The no-op auth target runs in its own process, so that the upstream
        # serves one request per client request in every row.
        noop_auth = _start_upstream(directory, "noop-auth", "bench.upstream:allow_all")
        stop.callback(noop_auth.stop)
        gateways = {}
        for server in SERVERS:
            gateways[server] = start_gateway(directory, server, upstream.url, relayed_uri(store_uri, relay))
            stop.callback(gateways[server].stop)

        targets = [AuthTarget("noop", noop_auth.port, "/")]
        targets += [AuthTarget(server, gateway.port, auth_path) for server, gateway in gateways.items()]
        nginx, nginx_ports = start_nginx(directory / "nginx", upstream.port, targets)
        stop.callback(nginx.stop)
        yield Stack(directory, store_uri, relay, upstream, noop_auth, gateways, nginx, nginx_ports, warm_key)


def seed_tokens(store_uri: str, directory: Path, cold_pool_sizes: dict[str, int]) -> str:
    """Insert active users and valid tokens the way udata stores them; return the warm key."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_uri, tz_aware=True)
    try:
        database = client[DATABASE]
        users = [ObjectId() for _ in range(USERS)]
        database.user.insert_many([{"_id": user, "active": True, "deleted": None} for user in users])
        database.api_token.create_index("token_hash", unique=True)

        warm_key = _insert_tokens(database, users, 1)[0]
        for name, size in cold_pool_sizes.items():
            keys = _insert_tokens(database, users, size)
            (directory / f"{name}.keys").write_text("\n".join(keys) + "\n")
        return warm_key
    finally:
        client.close()


def _insert_tokens(database: Any, users: list[ObjectId], count: int) -> list[str]:
    now = datetime.datetime.now(datetime.UTC)
    keys = [generate_token("udata_") for _ in range(count)]
    documents = [
        {
            "token_hash": hash_token(SECRET, key),
            "token_prefix": display_prefix(key, "udata_"),
            "user": users[index % len(users)],
            "name": "bench",
            "scopes": ["admin"],
            "kind": "api_key",
            "created_at": now,
            "last_used_at": None,
            "user_agents": [],
            "revoked_at": None,
            "expires_at": None,
        }
        for index, key in enumerate(keys)
    ]
    database.api_token.insert_many(documents, ordered=False)
    return keys


def _start_upstream(directory: Path, name: str, app: str) -> Server:
    port = free_port()
    arguments = ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    arguments += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    return start_python(name, arguments, port, directory)


def start_gateway(
    directory: Path, server: str, upstream_url: str, store_uri: str, checkout: Path = REPOSITORY, name: str = ""
) -> Server:
    """Run `gateway serve` from `checkout` under `server` with the benchmark's configuration."""
    name = name or f"gateway-{server}"
    config_path = directory / f"{name}.toml"
    config_path.write_text(
        GATEWAY_CONFIG.format(
            server=server,
            upstream_url=upstream_url,
            secret=SECRET,
            ttl=CACHE_TTL_SECONDS,
            max_entries=CACHE_MAX_ENTRIES,
            store_uri=store_uri,
            database=DATABASE,
        )
    )
    # Settings come from the file alone, whatever GATEWAY_* variables the caller has set.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    port = free_port()
    arguments = ["-m", "gateway", "serve", "--config", str(config_path), "--port", str(port)]
    return start_python(name, arguments, port, directory, environment, inherit=False, checkout=checkout)
