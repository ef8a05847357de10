"""Profile one gateway under wrk load with py-spy and print where its time goes.

    python -m bench.profile [--server uvicorn|granian] [--anonymous] [--auth-request] [--seconds N] [--output FILE]

Starts the benchmark's stack and loads the gateway in proxy mode (or through
nginx's auth_request) with the warm key (or no key). Meanwhile `py-spy
record` samples the process that serves requests (folded stacks, 250 samples
per second). Then it prints the functions with the most samples on top of
the stack ("self") and anywhere in it ("total"). py-spy comes with the
`bench` extra. Coroutines resumed by the event loop show without the loop's
frames, so "total" undercounts callers.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.stack import running_stack
from bench.wrk import run_wrk
from gateway.config import AuthConfig

SAMPLE_RATE = 250
TOP = 25
_LINE_NUMBER = re.compile(r":\d+\)$")


def summarize(folded: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Return the sample count, samples per innermost frame and per function anywhere in the stack."""
    total = 0
    innermost: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        innermost[frames[-1]] += count
        for function in {_LINE_NUMBER.sub(")", frame) for frame in frames}:
            anywhere[function] += count
    return total, innermost, anywhere


def serving_pid(server: str, pid: int) -> int:
    """Return the process that runs the application: granian runs it in a child worker."""
    if server != "granian":
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if not children:
        raise RuntimeError("granian has no worker process yet.")
    return int(children[0])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--anonymous", action="store_true", help="send no key instead of the cached one")
    parser.add_argument("--auth-request", action="store_true", help="load nginx's auth_request server instead")
    parser.add_argument("--seconds", type=int, default=8, help="seconds to sample (default 8)")
    parser.add_argument("--output", help="also keep the folded stacks in this file")
    arguments = parser.parse_args()
    if not 1 <= arguments.seconds <= 120:
        parser.error("--seconds must be 1 to 120")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: pip install -e '.[bench]'")

    with tempfile.TemporaryDirectory(prefix="gateway-profile-") as temporary:
        directory = Path(temporary)
        folded_path = Path(arguments.output) if arguments.output else directory / "folded.txt"
        with running_stack(directory, {}, AuthConfig().auth_request_path) as stack:
            gateway = stack.gateways[arguments.server]
            headers = [] if arguments.anonymous else [f"X-API-KEY: {stack.warm_key}"]
            port = stack.nginx_ports[arguments.server] if arguments.auth_request else gateway.port
            run_wrk(stack.url(port), 1, headers=headers)
            command = [py_spy, "record", "--pid", str(serving_pid(arguments.server, gateway.process.pid))]
            command += ["--duration", str(arguments.seconds), "--rate", str(SAMPLE_RATE), "--nonblocking"]
            command += ["--format", "raw", "--output", str(folded_path)]
            sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = run_wrk(stack.url(port), arguments.seconds + 1, headers=headers)
            sampler.wait(arguments.seconds + 30)
        total, innermost, anywhere = summarize(folded_path.read_text())

    load = ("auth_request, " if arguments.auth_request else "proxy, ") + (
        "anonymous" if arguments.anonymous else "cached key"
    )
    print(f"{arguments.server}, {load}: {result.requests_per_second:.0f} requests/s, {total} samples")
    print("\nself:")
    for function, count in innermost.most_common(TOP):
        print(f"  {count / total:6.1%}  {function}")
    print("\ntotal (gateway and aiohttp functions):")
    for function, count in anywhere.most_common():
        if "gateway/" in function or "aiohttp/" in function:
            print(f"  {count / total:6.1%}  {function}")


if __name__ == "__main__":
    main()
