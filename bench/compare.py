"""Compare this checkout's gateway with another checkout's, in the same run.

    python -m bench.compare OTHER_CHECKOUT [--server uvicorn|granian] [--rounds N] [--duration SECONDS]

Both gateways run side by side against the same upstream and store. Each
round loads one, then the other, with the cached key and then without a key.
On a shared machine the load changes from second to second, so the paired
figures of one round are compared, and the table shows their medians: requests
per second and the gateway's CPU time per request. Make OTHER_CHECKOUT with,
for example,
`mkdir /tmp/baseline && git archive COMMIT | tar -x -C /tmp/baseline`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench import measure
from bench.processes import Server
from bench.stack import Stack, running_stack, start_gateway
from bench.store_relay import relayed_uri
from bench.wrk import WrkResult, run_wrk
from gateway.config import AuthConfig

LOADS = ("cached key", "anonymous")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout of the gateway, the baseline")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (default 3)")
    arguments = parser.parse_args()
    if not (arguments.other / "gateway" / "__init__.py").exists():
        parser.error(f"{arguments.other} is not a checkout of the gateway")
    if not 1 <= arguments.rounds <= 20 or not 0.5 <= arguments.duration <= 60:
        parser.error("--rounds must be 1 to 20 and --duration 0.5 to 60 seconds")

    with tempfile.TemporaryDirectory(prefix="gateway-compare-") as temporary:
        directory = Path(temporary)
        with running_stack(directory, {}, AuthConfig().auth_request_path) as stack:
            store_uri = relayed_uri(stack.store_uri, stack.store_relay)
            baseline = start_gateway(
                directory, arguments.server, stack.upstream.url, store_uri, arguments.other.resolve(), "baseline"
            )
            try:
                gateways = {"baseline": baseline, "this checkout": stack.gateways[arguments.server]}
                figures = _run(stack, gateways, arguments.rounds, arguments.duration)
            finally:
                baseline.stop()

    print(f"{arguments.server}, {arguments.rounds} rounds of {arguments.duration:g} s, medians:")
    for load in LOADS:
        for name in gateways:
            rate, cpu = (statistics.median(values) for values in figures[(name, load)])
            print(f"  {load:<11} {name:<14} {rate:>7.0f} req/s {cpu:>6.0f} us CPU/req")
        current, baseline_cpu = figures[("this checkout", load)][1], figures[("baseline", load)][1]
        paired = [new / old for new, old in zip(current, baseline_cpu, strict=True)]
        print(f"  {load:<11} CPU per request, this checkout / baseline: {statistics.median(paired):.3f}")


def _run(
    stack: Stack, gateways: dict[str, Server], rounds: int, duration: float
) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    figures: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for name, gateway in gateways.items():
        for load in LOADS:
            figures[(name, load)] = ([], [])
            _load(stack, gateway, load, 1.0)
    for _ in range(rounds):
        for load in LOADS:
            for name, gateway in gateways.items():
                measure.wait_until_quiet()
                before = measure.process_tree_cpu_seconds(gateway.process.pid)
                result = _load(stack, gateway, load, duration)
                cpu = measure.process_tree_cpu_seconds(gateway.process.pid) - before
                figures[(name, load)][0].append(result.requests_per_second)
                figures[(name, load)][1].append(cpu / max(1, result.requests) * 1e6)
    return figures


def _load(stack: Stack, gateway: Server, load: str, duration: float) -> WrkResult:
    headers = [f"X-API-KEY: {stack.warm_key}"] if load == "cached key" else []
    return run_wrk(stack.url(gateway.port), duration, headers=headers)


if __name__ == "__main__":
    main()
