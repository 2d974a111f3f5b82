"""Constant labels on every exported series: ``environment``, ``region``, ``node``, ``adapter``.

Operators filter and group by them on every metric. Rather than threading four more labels through every
metric definition (and every engineer's new ones), the registry is exported through
``ConstantLabels``, a read-only view that adds them to each sample at collect time. Metric
definitions and hot paths stay as they are; a scrape pays one dict merge per sample.

The values come from configuration and are fixed for the life of the process, so they add no
cardinality: ``[metrics] environment`` / ``SOCKUDO_ENVIRONMENT``, ``[metrics] region`` /
``SOCKUDO_REGION``, ``[metrics] node`` / ``SOCKUDO_NODE`` (else ``node_id`` / ``NODE_ID``, else
the host name) and ``adapter`` = the adapter driver (``local`` or ``redis``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric

from sockudo.config import Config


def constant_labels(config: Config, hostname: str | None = None) -> dict[str, str]:
    """The four constant labels for this process, from configuration."""
    m = config.metrics
    node = m.node or config.node_id or hostname or socket.gethostname()
    return {"environment": m.environment, "region": m.region, "node": node, "adapter": config.adapter_driver}


class ConstantLabels:
    """A collector that yields ``source``'s metrics with ``labels`` added to every sample.

    A metric's own label of the same name wins (none of ours use these names). Pass it to
    ``prometheus_client.make_wsgi_app`` / ``generate_latest`` in place of the registry.
    """

    def __init__(self, source: Any, labels: Mapping[str, str]) -> None:
        self.source = source
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            yield relabel(family, self.labels)

    def restricted_registry(self, names: Iterable[str]) -> ConstantLabels:
        """``?name[]=`` filters are ignored: the endpoint always answers everything."""
        return self


def relabel(family: Metric, labels: Mapping[str, str]) -> Metric:
    out = Metric(family.name, family.documentation, family.type, family.unit)
    out.samples = [s._replace(labels={**labels, **s.labels}) for s in family.samples]
    return out
