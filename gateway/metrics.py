"""Prometheus metrics of one gateway process.

Each `GatewayMetrics` has its own registry, so several applications in one
process (the tests start many) never share counters. Labelled children are
created once here, so the request path pays a dictionary lookup and an
unlocked addition per metric, never a label resolution.

The children come from `gateway.loop_metrics` and take no lock, because
every update runs on the worker's one event-loop thread. The ASGI handlers,
the change-stream watchers and the token rehasher are coroutines on that loop, and
the proxy calls the upstream latency callback from its own coroutine. A metric
updated from another thread would need prometheus_client's locked children.
`render()` prints the same text that prometheus_client's `Counter`, `Gauge`
and `Histogram` printed for these metrics.

NOTE: with `server.workers` above 1, every worker keeps its own registry and a
scrape reads the worker that accepted the connection. prometheus-client's
multiprocess mode is not wired in.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.errors import AuthFailureReason
from gateway.loop_metrics import CounterMetric, GaugeMetric, HistogramMetric, LoopCollector

# The closed set of request outcomes counted by `gateway_requests_total`.
REQUEST_OUTCOMES = (
    "forwarded",
    "unauthorized",
    "forbidden",
    "store_unavailable",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_interrupted",
    "client_disconnected",
    "no_upstream",
)
# `gateway_authentications_total` results: success, every failure reason (throttled included), and the store failing.
AUTHENTICATION_RESULTS = (
    "success",
    *(reason.value for reason in AuthFailureReason),
    "store_unavailable",
)
# `gateway_cache_lookups_total` results. `stale` is a cached key served past
# its TTL because the store lookup failed (stale-if-error).
CACHE_RESULTS = ("hit", "negative_hit", "miss", "stale")
STORE_OPERATIONS = ("find_token", "rehash_token")
# The collections the gateway follows with change streams: `api_token` and the users collection.
CHANGE_STREAMS = ("tokens", "users")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REVOCATION_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """The gateway's counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        collector = LoopCollector()

        self.requests = collector.add(
            CounterMetric("gateway_requests", "Requests handled, by outcome.", "outcome", REQUEST_OUTCOMES)
        ).labelled()
        self.authentications = collector.add(
            CounterMetric(
                "gateway_authentications",
                "Requests that carried a key, by result.",
                "result",
                AUTHENTICATION_RESULTS,
            )
        ).labelled()
        self.cache = collector.add(
            CounterMetric(
                "gateway_cache_lookups",
                "Authentication cache lookups, by result.",
                "result",
                CACHE_RESULTS,
            )
        ).labelled()

        self.store_duration = collector.add(
            HistogramMetric(
                "gateway_store_request_duration_seconds",
                "Duration of token store operations, failed ones included.",
                LATENCY_BUCKETS,
                "operation",
                STORE_OPERATIONS,
            )
        ).labelled()
        self.upstream_duration = collector.add(
            HistogramMetric(
                "gateway_upstream_response_duration_seconds",
                "Time from sending a request upstream to its response headers.",
                LATENCY_BUCKETS,
            )
        ).unlabelled()
        self.in_flight = collector.add(
            GaugeMetric("gateway_requests_in_flight", "Requests being handled now.")
        ).unlabelled()

        self.revocation_lag = collector.add(
            HistogramMetric(
                "gateway_revocation_lag_seconds",
                "Time from a token or user change in the store (its wallTime) to its eviction from this process's "
                "cache, by change stream.",
                REVOCATION_LAG_BUCKETS,
                "stream",
                CHANGE_STREAMS,
            )
        ).labelled()
        self.change_stream_active = collector.add(
            GaugeMetric(
                "gateway_change_stream_active",
                "1 while the change stream on the token or users collection is open, else 0 (its changes then "
                "wait for the TTL).",
                "stream",
                CHANGE_STREAMS,
            )
        ).labelled()

        self.registry.register(collector)

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class StoreTimer:
    """Context manager that records the duration of one store operation, failed or not."""

    __slots__ = ("histogram", "started")

    def __init__(self, metrics: GatewayMetrics, operation: str) -> None:
        self.histogram = metrics.store_duration[operation]
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.histogram.observe(time.perf_counter() - self.started)
