"""Drive a URL with wrk and parse what it prints."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

CONNECTIONS = 32
THREADS = 1
# wrk stops on its own after the duration; the margin covers start-up and teardown.
TIMEOUT_MARGIN_SECONDS = 15.0

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_REQUESTS = re.compile(r"(\d+) requests in ")
_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

COLD_KEYS_SCRIPT = """\
-- Send each key of the file named by the first argument once, in order.
-- The benchmark gives every run a pool larger than it can send, so no key repeats.
local keys = {}
local position = 0

function init(args)
    for line in io.lines(args[1]) do
        keys[#keys + 1] = line
    end
end

function request()
    position = position % #keys + 1
    return wrk.format(nil, nil, {["X-API-KEY"] = keys[position]})
end
"""


@dataclasses.dataclass(frozen=True)
class WrkResult:
    """One wrk run: totals, rate and latency percentiles in milliseconds."""

    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def run_wrk(
    url: str,
    duration_seconds: float,
    headers: Sequence[str] = (),
    script: Path | None = None,
    script_arguments: Sequence[str] = (),
) -> WrkResult:
    """Run wrk against `url` with `CONNECTIONS` connections; raise RuntimeError when it fails."""
    command = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration_seconds:g}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    if script is not None:
        command += ["-s", str(script)]
    command.append(url)
    if script_arguments:
        command += ["--", *script_arguments]

    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_seconds + TIMEOUT_MARGIN_SECONDS, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed with status {completed.returncode}: {completed.stderr.strip()}")
    return parse_wrk_output(completed.stdout)


def parse_wrk_output(output: str) -> WrkResult:
    """Parse `wrk --latency` output; raise ValueError when a figure is missing."""
    requests = _REQUESTS.search(output)
    rate = _RATE.search(output)
    percentiles = {match[1]: float(match[2]) * _UNITS[match[3]] for match in _PERCENTILE.finditer(output)}
    if requests is None or rate is None or "50" not in percentiles or "99" not in percentiles:
        raise ValueError(f"Unexpected wrk output:\n{output}")

    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests=int(requests[1]),
        requests_per_second=float(rate[1]),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(count) for count in socket_errors.groups()) if socket_errors else 0,
    )
