"""A Sockudo user's config file starts this server: Sockudo's own shipped ``config.toml`` (and its
JSON form) with one warning per setting that has no effect here, and the settings that do apply
taking effect; and a multi-node Sockudo-style configuration forming one cluster over Redis.

Real ``python -m sockudo`` processes, a real redis-server, raw WebSocket clients and signed HTTP
API calls. PORT and METRICS_PORT (environment) move the listeners to free ports; everything
else comes from the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from sockudo.config import AppConfig
from tests.support.cluster import start_all, wait_formed
from tests.support.fakes import channel_auth
from tests.support.procs import RedisServer, ServerProcess
from tests.support.sdk import signed
from tests.support.wsraw import RawClient

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sockudo"
# The app of Sockudo's shipped files (not numeric: the Python SDK refuses it, so requests are signed here).
SHIPPED_APP = {"id": "app-id", "key": "app-key", "secret": "app-secret"}
KEY = SHIPPED_APP["key"]
MULTI_APP = {"id": "500", "key": "multi-key", "secret": "multi-secret"}


@pytest.fixture
def shipped(server_factory: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    def start(name: str = "config.toml", env: dict[str, str] | None = None) -> ServerProcess:
        return server_factory(config_text=(FIXTURES / name).read_text(encoding="utf-8"), config_name=name,
                              env=env or {})

    return start


def publish(server: ServerProcess, channel: str, data: str, app: dict[str, Any] = SHIPPED_APP,
            headers: dict[str, str] | None = None) -> requests.Response:
    body = {"name": "update", "channel": channel, "data": data}
    return signed(server, "POST", f"/apps/{app['id']}/events", body=body, app=app, headers=headers)


def private_auth(socket_id: str | None, channel: str) -> dict[str, str]:
    app = AppConfig(id=SHIPPED_APP["id"], key=SHIPPED_APP["key"], secret=SHIPPED_APP["secret"])
    return {"auth": channel_auth(app, socket_id or "", channel)}


def test_sockudos_shipped_config_starts_the_server_with_its_settings(shipped: Callable[..., ServerProcess]) -> None:
    server = shipped()
    log = server.log()
    for setting in ("config: mode has no effect here", "config: delta_compression has no effect here",
                    "config: app_manager.array.apps[0].policy.channels.channel_namespaces has no effect here"):
        assert log.count(setting) == 1, setting

    assert "config: cors" not in log  # applied: the REST API's CORS headers

    # [cors]: a listed origin is echoed with credentials; any other origin gets no CORS grant.
    listed = publish(server, "orders", "hi", headers={"Origin": "http://localhost:3001"})
    assert listed.headers["Access-Control-Allow-Origin"] == "http://localhost:3001"
    assert listed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "X-Sockudo-Push-Capability" in listed.headers["Access-Control-Allow-Headers"]
    stranger = publish(server, "orders", "hi", headers={"Origin": "https://evil.example"})
    assert stranger.status_code == 200 and "Access-Control-Allow-Origin" not in stranger.headers

    # [event_limits] max_payload_in_kb = 100 is the app's limit (this server's default is 10 KB).
    assert publish(server, "orders", "x" * 50_000).status_code == 200
    too_big = publish(server, "orders", "x" * 101 * 1024)
    assert too_big.status_code == 413, too_big.text

    # policy.features.enable_client_messages and policy.limits.max_client_events_per_second = 1000:
    # a burst of 30 client events is delivered (the default limit would close with 4301 after 10).
    sender = RawClient.connect(server, KEY)
    receiver = RawClient.connect(server, KEY)
    for client in (sender, receiver):
        assert client.activity_timeout == 120
        client.subscribe("private-room", private_auth(client.socket_id, "private-room"))
    for i in range(30):
        sender.send_json({"event": "client-typing", "channel": "private-room", "data": {"n": i}})
    for i in range(30):
        frame = receiver.expect("client-typing", channel="private-room")
        assert frame["data"] == {"n": i}
    sender.ping_pong()

    # [history] enabled = true: the history API answers with what was published.
    assert publish(server, "history-demo", "kept").status_code == 200
    page = signed(server, "GET", f"/apps/{SHIPPED_APP['id']}/channels/history-demo/history", app=SHIPPED_APP)
    assert page.status_code == 200, page.text
    assert [item["message"]["data"] for item in page.json()["items"]] == ["kept"]
    sender.close()
    receiver.close()


@pytest.mark.slow
def test_shipped_user_authentication_feature_closes_unauthenticated_sockets(
    shipped: Callable[..., ServerProcess],
) -> None:
    # policy.features.enable_user_authentication = true; the timeout shortened from 3600 s.
    server = shipped(env={"USER_AUTHENTICATION_TIMEOUT": "1"})
    client = RawClient.connect(server, KEY)
    assert client.expect_close(timeout=10).code == 4009


def test_sockudos_shipped_json_config_starts_the_server(shipped: Callable[..., ServerProcess]) -> None:
    server = shipped("config.json")
    assert "config: delta_compression has no effect here" in server.log()
    assert publish(server, "orders", "x" * 50_000).status_code == 200  # its [event_limits] too
    client = RawClient.connect(server, KEY)
    client.ping_pong()
    client.close()


# -- several nodes configured the Sockudo way --------------------------------------------------


def sockudo_node_config(node: str, redis_port: int) -> str:
    """A node's file as Sockudo deployments write it (JSON, Redis adapter, [database.redis]
    host/port, cluster health in milliseconds, the apps under policy tables)."""
    return json.dumps({
        "debug": False,
        "host": "127.0.0.1",
        "mode": "production",
        "path_prefix": "/",
        "shutdown_grace_period": 3,
        "instance": {"process_id": node},
        "adapter": {
            "driver": "redis",
            "redis": {"requests_timeout": 2000, "prefix": "sockudo_multinode:", "cluster_mode": False},
            "nats": {"servers": ["nats://nats:4222"], "prefix": "sockudo_nats:"},
            "cluster_health": {"enabled": True, "heartbeat_interval_ms": 1000, "node_timeout_ms": 3000,
                               "cleanup_interval_ms": 1000},
        },
        "database": {"redis": {"host": "127.0.0.1", "port": redis_port, "db": 0, "key_prefix": "sockudo:",
                               "sentinels": [], "cluster_nodes": []}},
        "cache": {"driver": "redis", "redis": {"prefix": "sockudo_cache:"}},
        "queue": {"driver": "redis", "redis": {"concurrency": 5, "prefix": "sockudo_queue:"}},
        "rate_limiter": {"enabled": False, "driver": "redis"},
        "app_manager": {"driver": "memory", "array": {"apps": [{
            **MULTI_APP, "enabled": True,
            "policy": {"limits": {"max_connections": 1000, "max_client_events_per_second": 100},
                       "features": {"enable_client_messages": True, "enable_user_authentication": False}},
        }]}},
        "event_limits": {"max_payload_in_kb": 100},
    }, indent=2)


@pytest.mark.usefixtures("flushed_redis")
def test_a_multi_node_sockudo_config_forms_one_cluster(
    server_factory: Callable[..., ServerProcess], redis_server: RedisServer,
) -> None:
    nodes = [server_factory(start=False, config_text=sockudo_node_config(f"node-{i}", redis_server.port),
                            config_name="node.json") for i in (1, 2)]
    start_all(nodes)
    wait_formed(nodes)
    for i, node in enumerate(nodes, 1):
        assert f'node="node-{i}"' in node.metrics_text()  # instance.process_id is the node's id
        assert "adapter.nats has no effect here" not in node.log()  # the driver is redis: NATS is unused
        assert "config: mode has no effect here" in node.log()

    # A client on node 2 receives what is published through node 1.
    client = RawClient.connect(nodes[1], "multi-key")
    client.subscribe("orders")
    response = publish(nodes[0], "orders", "across", app=MULTI_APP)
    assert response.status_code == 200, response.text
    frame = client.expect("update", channel="orders")
    assert frame["data"] == "across"
    # [event_limits] applies on every node.
    assert publish(nodes[1], "orders", "x" * 50_000, app=MULTI_APP).status_code == 200
    client.close()
