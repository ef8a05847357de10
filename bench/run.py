"""Benchmark the gateway against its upstream and nginx on loopback; print one table.

    python -m bench.run [--rounds N] [--duration SECONDS] [--skip-million]

Starts SecantusDB, a trivial upstream app, the gateway under uvicorn and
under granian, and nginx; drives each row with wrk (32 connections) for
`--duration` seconds, `--rounds` times in turn, and prints the medians. Every
ratio compares a row with "direct" of the same round. BENCHMARKS.md explains
the rows and records results.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import measure
from bench.stack import Stack, running_stack
from bench.wrk import COLD_KEYS_SCRIPT, WrkResult, run_wrk
from gateway.config import AuthConfig

DEFAULT_ROUNDS = 3
DEFAULT_DURATION_SECONDS = 3.0
WARM_UP_SECONDS = 1.0
# A cold row sends a few hundred keys per second; each round gets a pool it cannot exhaust.
COLD_POOL_SIZE = 6_000
BURST_KEYS = 1_000
CACHE_SIZES = (100_000, 1_000_000)

# Targets on a 2-core machine, one gateway worker, 32 connections.
PROXY_RATIO_TARGET = 0.35
AUTH_REQUEST_RATIO_TARGET = 0.33
ADDED_P99_TARGET_MS = 3.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: `kind` is "warm", "cold" or "anonymous"; `port` is where wrk aims."""

    label: str
    port: int
    kind: str = "anonymous"
    gateway: str | None = None


@dataclasses.dataclass
class RowResults:
    row: Row
    runs: list[WrkResult] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)
    store_lookups: int = 0
    gateway_cpu_seconds: float = 0.0

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)

    @property
    def requests(self) -> int:
        return sum(run.requests for run in self.runs)

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def gateway_cpu_microseconds(self) -> float | None:
        if self.row.gateway is None:
            return None
        return self.gateway_cpu_seconds / max(1, self.requests) * 1e6


def main() -> None:
    arguments = _parse_arguments()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as temporary:
        directory = Path(arguments.keep) if arguments.keep else Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        report = run(directory, arguments.rounds, arguments.duration, arguments.skip_million)
    print_report(report)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


def _parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="times each row runs (default 3)")
    parser.add_argument(
        "--duration", type=float, default=DEFAULT_DURATION_SECONDS, help="seconds per wrk run (default 3)"
    )
    parser.add_argument("--skip-million", action="store_true", help="measure the cache at 100,000 entries only")
    parser.add_argument("--keep", metavar="DIR", help="keep configs, keys and server logs in DIR")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    arguments = parser.parse_args()
    if not 1 <= arguments.rounds <= 20 or not 0.5 <= arguments.duration <= 60:
        parser.error("--rounds must be 1 to 20 and --duration 0.5 to 60 seconds")
    return arguments


def run(directory: Path, rounds: int, duration: float, skip_million: bool) -> dict[str, Any]:
    """Start the stack, run every row `rounds` times and the side measurements; return the report."""
    started = time.monotonic()
    load_before = measure.machine()
    auth_path = AuthConfig().auth_request_path
    pools = {f"cold-{index}": COLD_POOL_SIZE for index in range(rounds)} | {"burst": BURST_KEYS}

    with running_stack(directory, pools, auth_path) as stack:
        (directory / "cold.lua").write_text(COLD_KEYS_SCRIPT)
        auth_route = {server: _has_auth_route(stack, server, auth_path) for server in stack.gateways}
        rows = _rows(stack, auth_route)
        _warm_up(stack, rows, duration)
        results = _run_rounds(stack, rows, rounds, duration)
        burst = asyncio.run(
            measure.cold_burst(stack.url(stack.gateways["uvicorn"].port), _keys(directory, "burst"), stack.store_relay)
        )
        gateway_rss = {server: measure.process_tree_rss_mib(gw.process.pid) for server, gw in stack.gateways.items()}

    sizes = CACHE_SIZES[:1] if skip_million else CACHE_SIZES
    cache = [measure.cache_memory(entries) for entries in sizes]
    return {
        "machine": load_before,
        "load_average_after": measure.machine()["load_average"],
        "rounds": rounds,
        "duration_seconds": duration,
        "rows": [_row_report(result) for result in results],
        "auth_route": auth_route,
        "burst": dataclasses.asdict(burst),
        "gateway_rss_mib": gateway_rss,
        "cache": cache,
        "elapsed_seconds": time.monotonic() - started,
    }


def _rows(stack: Stack, auth_route: dict[str, bool]) -> list[Row]:
    ports = stack.nginx_ports
    uvicorn = stack.gateways["uvicorn"].port
    granian = stack.gateways["granian"].port
    rows = [
        Row("direct to the upstream", stack.upstream.port),
        Row("nginx proxy_pass, no auth", ports["proxy"]),
        Row("nginx auth_request to a no-op app", ports["noop"]),
        Row("gateway proxy, cached key (uvicorn)", uvicorn, "warm", "uvicorn"),
        Row("gateway proxy, cached key (granian)", granian, "warm", "granian"),
    ]
    for server in ("uvicorn", "granian"):
        if auth_route[server]:
            rows.append(Row(f"nginx auth_request to gateway, cached key ({server})", ports[server], "warm", server))
    rows += [
        Row("gateway proxy, keys never seen (uvicorn)", uvicorn, "cold", "uvicorn"),
        Row("gateway proxy, anonymous (uvicorn)", uvicorn, gateway="uvicorn"),
        Row("gateway proxy, anonymous (granian)", granian, gateway="granian"),
    ]
    return rows


def _has_auth_route(stack: Stack, server: str, auth_path: str) -> bool:
    # Without its own auth_request route the gateway forwards the path to the
    # upstream, whose responses carry `x-bench-upstream`.
    request = urllib.request.Request(
        stack.url(stack.gateways[server].port, auth_path), headers={"X-API-KEY": stack.warm_key}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers.get("x-bench-upstream") is None
    except urllib.error.HTTPError:
        return False


def _warm_up(stack: Stack, rows: list[Row], duration: float) -> None:
    # The first requests open connections and fill the warm key's cache entry.
    for row in rows:
        if row.kind != "cold":
            _run_row(stack, row, min(WARM_UP_SECONDS, duration), 0)


def _run_rounds(stack: Stack, rows: list[Row], rounds: int, duration: float) -> list[RowResults]:
    results = [RowResults(row) for row in rows]
    for round_index in range(rounds):
        direct: float | None = None
        for result in results:
            measure.wait_until_quiet()
            lookups_before = stack.store_relay.token_lookups()
            cpu_before = _gateway_cpu_seconds(stack, result.row)
            run = _run_row(stack, result.row, duration, round_index)
            result.store_lookups += stack.store_relay.token_lookups() - lookups_before
            result.gateway_cpu_seconds += _gateway_cpu_seconds(stack, result.row) - cpu_before
            result.runs.append(run)
            direct = direct or run.requests_per_second
            result.ratios.append(run.requests_per_second / direct)
    return results


def _gateway_cpu_seconds(stack: Stack, row: Row) -> float:
    if row.gateway is None:
        return 0.0
    return measure.process_tree_cpu_seconds(stack.gateways[row.gateway].process.pid)


def _run_row(stack: Stack, row: Row, duration: float, round_index: int) -> WrkResult:
    url = stack.url(row.port)
    if row.kind == "warm":
        return run_wrk(url, duration, headers=[f"X-API-KEY: {stack.warm_key}"])
    if row.kind == "cold":
        keys_path = stack.directory / f"cold-{round_index}.keys"
        return run_wrk(url, duration, script=stack.directory / "cold.lua", script_arguments=[str(keys_path)])
    return run_wrk(url, duration)


def _keys(directory: Path, pool: str) -> list[str]:
    return (directory / f"{pool}.keys").read_text().split()


def _row_report(result: RowResults) -> dict[str, Any]:
    return {
        "label": result.row.label,
        "kind": result.row.kind,
        "requests_per_second": result.median("requests_per_second"),
        "p50_ms": result.median("p50_ms"),
        "p99_ms": result.median("p99_ms"),
        "ratio": statistics.median(result.ratios),
        "ratio_min": min(result.ratios),
        "ratio_max": max(result.ratios),
        "requests": result.requests,
        "errors": result.errors,
        "store_lookups": result.store_lookups,
        "gateway_cpu_microseconds": result.gateway_cpu_microseconds,
    }


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    load = ", ".join(f"{value:.2f}" for value in machine["load_average"])
    load_after = ", ".join(f"{value:.2f}" for value in report["load_average_after"])
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}")
    print(f"Load average before: {load}; after: {load_after}")
    print(f"{report['rounds']} round(s) of {report['duration_seconds']:g} s per row, wrk 32 connections; medians.")
    print()
    header = (
        f"{'row':<52} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} {'(min-max)':>11}"
        f" {'errors':>6} {'gw CPU':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
        print(
            f"{row['label']:<52} {row['requests_per_second']:>8.0f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}"
            f" {row['ratio']:>6.2f} {spread:>11} {row['errors']:>6} {_microseconds(row['gateway_cpu_microseconds'])}"
        )
    for server, present in report["auth_route"].items():
        if not present:
            print(f"(no auth_request row for {server}: this gateway has no auth_request route)")
    print("gw CPU: user and system CPU time of the gateway's processes per request, in microseconds.")
    print()
    _print_store_and_memory(report)
    print()
    _print_targets(report)
    print(f"\nTotal time: {report['elapsed_seconds']:.0f} s")


def _microseconds(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>5.0f}us"


def _print_store_and_memory(report: dict[str, Any]) -> None:
    for row in report["rows"]:
        if row["kind"] in ("warm", "cold"):
            per_request = row["store_lookups"] / max(1, row["requests"])
            # wrk counts completed requests only; up to 32 more are in flight when it stops.
            in_flight = " + up to 32 in flight per run" if row["kind"] == "cold" else ""
            print(
                f"Store lookups per request, {row['label']}: {per_request:.4f}"
                f" ({row['store_lookups']} in {row['requests']} requests{in_flight})"
            )
    burst: dict[str, Any] = report["burst"]
    print(
        f"Cold burst: {burst['keys']} distinct valid keys, 32 at a time, in {burst['seconds']:.2f} s:"
        f" statuses {burst['statuses']}, {burst['failures']} connection failures,"
        f" {burst['store_lookups']} store lookups"
    )
    for server, mib in report["gateway_rss_mib"].items():
        print(f"Gateway resident memory after the run ({server}, all processes): {mib:.0f} MiB")
    for cache in report["cache"]:
        print(
            f"Cache memory at {cache['entries']:,} entries: {cache['bytes_per_entry']:.0f} bytes per entry"
            f" (process resident {cache['resident_mib']:.0f} MiB)"
        )


def _print_targets(report: dict[str, Any]) -> None:
    rows = {row["label"]: row for row in report["rows"]}
    direct = rows["direct to the upstream"]
    proxy = rows["gateway proxy, cached key (uvicorn)"]
    burst = report["burst"]
    checks = [
        (f"proxy mode, cached key >= {PROXY_RATIO_TARGET} of direct (uvicorn)", proxy["ratio"] >= PROXY_RATIO_TARGET),
        (
            f"p99 added over direct < {ADDED_P99_TARGET_MS:g} ms in proxy mode (uvicorn)",
            proxy["p99_ms"] - direct["p99_ms"] < ADDED_P99_TARGET_MS,
        ),
        (
            "warm path: zero store lookups",
            all(row["store_lookups"] == 0 for row in rows.values() if row["kind"] == "warm"),
        ),
        (
            "cold burst: one store lookup per key, no errors",
            burst["store_lookups"] == burst["keys"]
            and burst["statuses"] == {200: burst["keys"]}
            and burst["failures"] == 0,
        ),
    ]
    auth_row = rows.get("nginx auth_request to gateway, cached key (uvicorn)")
    if auth_row is not None:
        checks.insert(
            1,
            (
                f"auth_request >= {AUTH_REQUEST_RATIO_TARGET} of direct (uvicorn)",
                auth_row["ratio"] >= AUTH_REQUEST_RATIO_TARGET,
            ),
        )
    print("Targets:")
    for description, is_met in checks:
        print(f"  [{'met' if is_met else 'NOT MET'}] {description}")


if __name__ == "__main__":
    main()
