"""Lock-free metric children: the update rules they share with prometheus_client."""

from __future__ import annotations

import pytest

from gateway.loop_metrics import CounterMetric, HistogramMetric, LoopCounter, LoopGauge


def test_loop_counter_rejects_negative_amount() -> None:
    counter = LoopCounter()
    counter.inc(2)

    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)

    assert counter.value == 2.0


def test_loop_gauge_set_stores_float() -> None:
    gauge = LoopGauge()

    gauge.set(True)

    assert gauge.value == 1.0
    assert isinstance(gauge.value, float)


@pytest.mark.parametrize(
    ("amount", "bucket"),
    [
        (-1.0, "0.5"),  # below every bound: the lowest bucket, as in prometheus_client
        (0.5, "0.5"),  # on a bound: that bound's bucket, since `le` means at most
        (0.5000001, "1.0"),
        (1.0, "1.0"),
        (1.5, "+Inf"),
    ],
)
def test_loop_histogram_observe_picks_bucket(amount: float, bucket: str) -> None:
    metric = HistogramMetric("duration_seconds", "A duration.", (0.5, 1.0))
    histogram = metric.unlabelled()

    histogram.observe(amount)

    counts = {
        sample.labels["le"]: sample.value for sample in metric.collect().samples if sample.name.endswith("_bucket")
    }
    first_cumulative = next(bound for bound, count in counts.items() if count == 1.0)
    assert first_cumulative == bucket
    assert counts["+Inf"] == 1.0
    assert histogram.sum == amount


def test_histogram_metric_keeps_one_infinite_bound() -> None:
    metric = HistogramMetric("duration_seconds", "A duration.", (0.5, float("inf")))

    bounds = [sample.labels["le"] for sample in metric.collect().samples if sample.name.endswith("_bucket")]

    assert bounds == ["0.5", "+Inf"]


def test_counter_metric_labelled_children_are_distinct() -> None:
    metric = CounterMetric("requests", "Requests.", "outcome", ("ok", "failed"))
    children = metric.labelled()

    children["ok"].inc()

    values = {
        sample.labels["outcome"]: sample.value for sample in metric.collect().samples if sample.name.endswith("_total")
    }
    assert values == {"ok": 1.0, "failed": 0.0}
