"""Measurements beside wrk: store lookups, resident memory, a cold burst and the machine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.processes import REPOSITORY
from bench.store_relay import StoreRelay

BURST_CONCURRENCY = 32


@dataclasses.dataclass(frozen=True)
class BurstResult:
    keys: int
    statuses: dict[int, int]
    failures: int
    store_lookups: int
    seconds: float


async def cold_burst(url: str, keys: list[str], relay: StoreRelay) -> BurstResult:
    """Send one request per key, `BURST_CONCURRENCY` at a time, and count statuses and store lookups."""
    statuses: dict[int, int] = {}
    failures = 0
    semaphore = asyncio.Semaphore(BURST_CONCURRENCY)
    loop = asyncio.get_running_loop()

    async def send(session: aiohttp.ClientSession, key: str) -> None:
        nonlocal failures
        async with semaphore:
            try:
                async with session.get(url, headers={"X-API-KEY": key}) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except aiohttp.ClientError:
                failures += 1

    before = relay.token_lookups()
    started = loop.time()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=BURST_CONCURRENCY)
    ) as session:
        await asyncio.gather(*(send(session, key) for key in keys))
    seconds = loop.time() - started
    return BurstResult(len(keys), statuses, failures, relay.token_lookups() - before, seconds)


def process_tree_rss_mib(pid: int) -> float:
    """Return the resident memory of `pid` and its descendants in MiB (granian runs workers as children)."""
    total_kib = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        total_kib += _rss_kib(current)
        pending.extend(_children(current))
    return total_kib / 1024


def process_tree_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time used so far by `pid` and its descendants."""
    ticks = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            # Fields 14 and 15 of /proc/PID/stat, counted after the command name in parentheses.
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
        pending.extend(_children(current))
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(
    busy_fraction: float = 0.2, quiet_seconds: float = 1.0, window: float = 0.25, timeout: float = 15.0
) -> float:
    """Wait until the CPUs stay under `busy_fraction` busy for `quiet_seconds`; return the seconds waited.

    Work left over from a row would otherwise slow the next one. After a
    burst of new keys, the gateway flushes usage records each second, and the
    store works on them for a few seconds with idle gaps of about half a
    second. Gives up after `timeout` seconds on a machine that other jobs
    keep busy.
    """
    started = time.monotonic()
    quiet_since = started
    busy, total = _cpu_ticks()
    while time.monotonic() - started < timeout:
        time.sleep(window)
        new_busy, new_total = _cpu_ticks()
        now = time.monotonic()
        if new_total > total and (new_busy - busy) / (new_total - total) >= busy_fraction:
            quiet_since = now
        elif now - quiet_since >= quiet_seconds:
            break
        busy, total = new_busy, new_total
    return time.monotonic() - started


def _cpu_ticks() -> tuple[int, int]:
    # The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return children


def cache_memory(entries: int) -> dict[str, float]:
    """Run `bench.cache_memory` in a fresh process and return what it measured."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.cache_memory", str(entries)],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=300,
        check=True,
    )
    result: dict[str, float] = json.loads(completed.stdout)
    return result


def machine() -> dict[str, Any]:
    """Describe the machine and how loaded it was: CPU model, cores, load average."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()}
