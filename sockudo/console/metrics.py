"""The console's own numbers, read from the tap at scrape time (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sockudo.console.tap import EventTap


class ConsoleCollector:
    def __init__(self, tap: EventTap, prefix: str = "sockudo_") -> None:
        self.tap = tap
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        dropped = CounterMetricFamily(
            f"{p}console_dropped_events",
            "Console events dropped instead of slowing the server: a page's queue was full (its oldest events), "
            "or the queue of events for other nodes' consoles was full", labels=["stage"],
        )
        dropped.add_metric(["page"], self.tap.page_dropped)
        dropped.add_metric(["relay"], self.tap.outbound_dropped)
        yield dropped
        streams = GaugeMetricFamily(f"{p}console_streams", "Console pages streaming this node's event log")
        streams.add_metric([], len(self.tap.watchers))
        yield streams
