"""Measure what the access and audit logs cost per request, on loopback.

Starts an embedded store, an echo upstream and two gateways (logs on and
logs off, both writing JSON lines to /dev/null at INFO), then sends the same
authenticated GET through each, alternating rounds. Client, gateways and
upstream share this process, and the machine is shared with other work, so
the script reports process CPU time per request (all three parts), which
other processes' load does not inflate, next to wall time.

    python scripts/measure_logging_cost.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import httpx
import pymongo
from bson import ObjectId

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.access_log import AccessLog
from gateway.app import GatewayApp
from gateway.audit import AuditLog, AuditOutcome
from gateway.authenticator import Identity
from gateway.config import load_config
from gateway.embedded import EmbeddedStore
from gateway.header_syntax import has_invalid_header
from gateway.logs import JsonFormatter
from gateway.tokens import generate_token, hash_token
from tests.support.servers import ThreadedServer
from tests.support.upstream import EchoUpstream

SECRET = "measure-secret-0123456789-abcdef"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and gateway")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    arguments = parser.parse_args()

    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)

    with tempfile.TemporaryDirectory() as data, EmbeddedStore(data) as store:
        key = seed_token(store.uri)
        upstream = ThreadedServer(EchoUpstream()).start()
        gateways = {
            "logs on": start_gateway(store.uri, upstream.url, logs=True),
            "logs off": start_gateway(store.uri, upstream.url, logs=False),
        }
        cpu: dict[str, list[float]] = {name: [] for name in gateways}
        wall: dict[str, list[float]] = {name: [] for name in gateways}
        for _ in range(arguments.rounds):
            for name, gateway in gateways.items():
                cpu_sample, wall_sample = time_requests(gateway.url, key, arguments.requests)
                cpu[name].append(cpu_sample)
                wall[name].append(wall_sample)
        for gateway in gateways.values():
            gateway.stop()
        upstream.stop()

    for name in gateways:
        shown = ", ".join(f"{sample:.0f}" for sample in cpu[name])
        print(
            f"{name}: median CPU {statistics.median(cpu[name]):.0f} us/request (rounds: {shown}), "
            f"median wall {statistics.median(wall[name]):.0f} us/request"
        )
    difference = statistics.median(cpu["logs on"]) - statistics.median(cpu["logs off"])
    print(f"difference: {difference:.0f} us of CPU per request")
    time_request_work()


def time_request_work() -> None:
    """Time the per-request work of the logs alone, without sockets: the loopback difference is noisy."""
    config = load_config(None, {"GATEWAY_TOKENS_SECRET": SECRET})
    access_log, audit = AccessLog(config.logging), AuditLog(True)
    identity = Identity("5f0c2e4a9d1b2c3d4e5f6a7b", ObjectId(), "udata_abcdefgh", ("admin",), None, frozenset())
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"user-agent", b"python-httpx/0.29.0"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"x-api-key", b"udata_" + b"a" * 64),
    ]
    scope = {"method": "GET", "path": "/api/1/datasets/", "raw_path": b"/api/1/datasets/", "headers": headers}

    def request_id_and_header_check() -> None:
        has_invalid_header(headers, b"x-api-key")
        record = access_log.begin(scope, "127.0.0.1")
        access_log.upstream_headers(list(headers), record)

    def log_lines() -> None:
        record = access_log.begin(scope, "127.0.0.1")
        record.status = 200
        record.identity = identity
        audit.write(AuditOutcome.SUCCESS, record.request_id, ("127.0.0.1", "GET", record.path), identity)
        access_log.finish(record)

    for name, work in (
        ("request id and header check", request_id_and_header_check),
        ("access and audit lines", log_lines),
    ):
        seconds = min(timeit.repeat(work, number=10_000, repeat=5)) / 10_000
        print(f"{name}: {seconds * 1_000_000:.1f} us per request (best of 5 x 10,000, JSON to /dev/null)")


def seed_token(uri: str) -> str:
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(uri)
    user = ObjectId()
    plaintext = generate_token("udata_")
    client.udata.user.insert_one({"_id": user, "active": True, "deleted": None})
    client.udata.api_token.insert_one({"token_hash": hash_token(SECRET, plaintext), "user": user, "token_prefix": ""})
    client.close()
    return plaintext


def start_gateway(uri: str, upstream_url: str, logs: bool) -> ThreadedServer:
    environ = {
        "GATEWAY_TOKENS_SECRET": SECRET,
        "GATEWAY_STORE_URI": uri,
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_LOGGING_ACCESS_LOG": str(logs),
        "GATEWAY_LOGGING_AUDIT_LOG": str(logs),
    }
    return ThreadedServer(GatewayApp(load_config(None, environ))).start()


def time_requests(url: str, key: str, count: int) -> tuple[float, float]:
    """Return the mean process CPU and wall microseconds per request of `count` keep-alive GETs."""
    with httpx.Client(base_url=url, headers={"X-API-KEY": key}) as client:
        client.get("/warm-up").raise_for_status()
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        for _ in range(count):
            client.get("/measure")
        cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    return cpu / count * 1_000_000, wall / count * 1_000_000


if __name__ == "__main__":
    main()
