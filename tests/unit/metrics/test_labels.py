"""Constant labels on every exported series (environment, region, node, adapter) and the
``[metrics]`` / ``[metrics.tcp_exporter]`` / health configuration keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sockudo.config import Config, MetricsConfig, load_config
from sockudo.core.errors import ConfigError
from sockudo.metrics.labels import ConstantLabels, constant_labels
from sockudo.metrics.registry import Metrics


def test_constant_labels_come_from_config_and_fall_back_sensibly() -> None:
    config = replace(Config(), metrics=MetricsConfig(environment="prod", region="eu-west-1", node="edge-7"),
                     adapter_driver="redis")
    assert constant_labels(config) == {"environment": "prod", "region": "eu-west-1", "node": "edge-7",
                                       "adapter": "redis"}
    assert constant_labels(replace(Config(), node_id="n-42"))["node"] == "n-42"
    assert constant_labels(Config(), hostname="host-1") == {"environment": "default", "region": "default",
                                                            "node": "host-1", "adapter": "local"}


def test_every_sample_gets_the_labels_and_a_metric_s_own_label_wins() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, port=9601, process=True)
    metrics.app("a1").connected.inc()
    metrics.broadcast_latency("a1", "public", 3, 2.0)
    from prometheus_client import Gauge

    Gauge("odd", "has its own node label", ["node"], registry=registry).labels("mine").set(1)
    view = ConstantLabels(registry, {"environment": "test", "region": "r1", "node": "n1", "adapter": "local"})
    text = generate_latest(view).decode()
    found = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert len(found) > 20
    for s in found:
        assert {"environment", "region", "node", "adapter"} <= set(s.labels), s
    odd = next(s for s in found if s.name == "odd")
    assert odd.labels["node"] == "mine"
    connected = next(s for s in found if s.name == "sockudo_connected")
    assert connected.labels == {"environment": "test", "region": "r1", "node": "n1", "adapter": "local",
                                "app_id": "a1", "port": "9601"}
    assert view.restricted_registry(["odd"]) is view  # ?name[]= is ignored: always everything


def test_metrics_config_keys_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[metrics]\nenvironment = "staging"\nregion = "us"\nnode = "n9"\n'
                    '[metrics.tcp_exporter]\nenabled = true\nhost = "0.0.0.0"\nport = 5555\nbuffer_size = 64\n')
    config = load_config(str(path), env={})
    tcp = config.metrics.tcp_exporter
    assert (config.metrics.environment, config.metrics.region, config.metrics.node) == ("staging", "us", "n9")
    assert (tcp.enabled, tcp.host, tcp.port, tcp.buffer_size) == (True, "0.0.0.0", 5555, 64)
    env = {"SOCKUDO_ENVIRONMENT": "prod", "SOCKUDO_REGION": "eu", "SOCKUDO_NODE": "x1",
           "METRICS_TCP_EXPORTER_ENABLED": "false", "METRICS_TCP_EXPORTER_PORT": "6000",
           "METRICS_TCP_EXPORTER_BUFFER_SIZE": "8", "METRICS_TCP_EXPORTER_HOST": "127.0.0.2",
           "HEALTH_CHECK_TIMEOUT_MS": "750"}
    config = load_config(str(path), env=env)
    tcp = config.metrics.tcp_exporter
    assert (config.metrics.environment, config.metrics.region, config.metrics.node) == ("prod", "eu", "x1")
    assert (tcp.enabled, tcp.host, tcp.port, tcp.buffer_size) == (False, "127.0.0.2", 6000, 8)
    assert config.health_check_timeout_ms == 750
    defaults = load_config(None, env={})
    assert defaults.health_check_timeout_ms == 2000
    assert (defaults.metrics.tcp_exporter.enabled, defaults.metrics.tcp_exporter.port,
            defaults.metrics.tcp_exporter.buffer_size) == (False, 5000, 1024)


@pytest.mark.parametrize(("text", "env", "key"), [
    ("[metrics.tcp_exporter]\nbuffer_size = 0\n", {}, "metrics.tcp_exporter.buffer_size"),
    ("[metrics.tcp_exporter]\nport = \"x\"\n", {}, "metrics.tcp_exporter.port"),
    ("[metrics.tcp_exporter]\nenabled = true\nport = 70000\n", {}, "metrics.tcp_exporter.port"),
    ("[metrics.tcp_exporter]\nbufer_size = 1\n", {}, "metrics.tcp_exporter.bufer_size"),
    ("", {"HEALTH_CHECK_TIMEOUT_MS": "0"}, "health_check_timeout_ms"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(path), env=env)
