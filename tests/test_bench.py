"""Units of the benchmark: wrk output parsing and the store relay's command reading."""

from __future__ import annotations

import json
import subprocess
import sys

import bson
import pytest

from bench.store_relay import OP_MSG, command_of
from bench.wrk import parse_wrk_output
from tests.support.cli import REPOSITORY_ROOT

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  500.00us  20.00ms   90.00%
    Req/Sec    25.00k     1.00k   27.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.10ms
     90%    1.50ms
     99%    1.20s
  75000 requests in 3.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  25000.50
Transfer/sec:      3.33MB
"""


def test_parse_wrk_output_reads_every_figure() -> None:
    result = parse_wrk_output(WRK_OUTPUT)

    assert result.requests == 75000
    assert result.requests_per_second == 25000.50
    assert result.p50_ms == pytest.approx(0.85)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.non_2xx == 4
    assert result.socket_errors == 3
    assert result.errors == 7


def test_parse_wrk_output_rejects_missing_percentiles() -> None:
    with pytest.raises(ValueError, match="Unexpected wrk output"):
        parse_wrk_output(WRK_OUTPUT.replace("     99%    1.20s\n", ""))


def _op_msg(document: dict[str, object], opcode: int = OP_MSG) -> bytes:
    body = (0).to_bytes(4, "little") + b"\0" + bson.encode(document)
    header = (16 + len(body)).to_bytes(4, "little") + (7).to_bytes(4, "little") + bytes(4)
    return header + opcode.to_bytes(4, "little") + body


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"aggregate": "api_token", "pipeline": [], "$db": "udata"}, ("aggregate", "api_token")),
        ({"find": "user", "filter": {}, "$db": "udata"}, ("find", "user")),
        # A command whose first value is not a collection name.
        ({"hello": 1, "$db": "admin"}, ("hello", "")),
    ],
)
def test_command_of_reads_name_and_collection(document: dict[str, object], expected: tuple[str, str]) -> None:
    assert command_of(_op_msg(document)) == expected


def test_command_of_ignores_other_opcodes() -> None:
    # 2012 is OP_COMPRESSED, whose payload the relay does not parse.
    assert command_of(_op_msg({"aggregate": "api_token"}, opcode=2012)) is None


def test_cache_memory_fills_real_cache() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.cache_memory", "1000"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["entries"] == 1000
    assert figures["bytes_per_entry"] > 0
