"""A Sockudo config file is a config file here: every Sockudo key is known (applied, applied
under our name, or reported as having no effect), and keys neither server knows stay errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sockudo.config import Config, load_config
from sockudo.config.sockudo_keys import CATALOGUE, IGNORED, RENAMED, SAME, TABLES, covering, translate
from sockudo.core.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "sockudo"
SHIPPED_TOML = str(FIXTURES / "config.toml")
SHIPPED_JSON = str(FIXTURES / "config.json")


def _sockudo_keys() -> list[str]:
    lines = (FIXTURES / "keys.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., str]:
    def make(text: str, name: str = "config.toml") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return make


# -- the catalogue ------------------------------------------------------------------------------


def test_every_sockudo_key_is_in_the_catalogue() -> None:
    keys = _sockudo_keys()
    assert len(keys) > 700
    unknown = [k for k in keys if covering(k) is None and k.removesuffix("[]") not in TABLES and k not in TABLES]
    assert unknown == []


def test_the_catalogue_lists_only_keys_sockudo_has() -> None:
    keys = set(_sockudo_keys())
    keys |= {k.removesuffix("[]") for k in keys}
    assert [path for path in CATALOGUE if path not in keys] == []


def test_every_entry_says_what_it_does_here() -> None:
    for entry in CATALOGUE.values():
        assert entry.effect in (SAME, RENAMED, IGNORED)
        if entry.effect == IGNORED:
            assert entry.note, entry.path
        if entry.effect == RENAMED:
            assert entry.ours, entry.path


# -- Sockudo's shipped files --------------------------------------------------------------------


def _assert_shipped_settings(config: Config) -> None:
    """What Sockudo's shipped file sets that this server does, applied."""
    assert (config.host, config.port) == ("0.0.0.0", 6001)
    assert config.activity_timeout == 120
    assert config.user_authentication_timeout == 3600
    assert config.websocket_max_payload_kb == 64
    assert config.websocket_max_buffer_bytes == 4194304  # [websocket] max_bytes
    assert config.health_check_timeout_ms == 2000
    assert config.adapter_driver == "local"
    assert (config.heartbeat_interval, config.node_timeout) == (10.0, 30.0)  # [adapter.cluster_health], in ms
    assert config.webhooks.batching_enabled is False
    assert config.webhooks.queue_driver == "memory"  # [queue] driver = "memory"
    assert config.rate_limiter.enabled is False
    assert config.metrics.port == 9601 and config.metrics.prefix == "sockudo_"
    assert config.idempotency.ttl_seconds == 120
    (app,) = config.apps
    assert (app.id, app.key, app.secret, app.enabled) == ("app-id", "app-key", "app-secret", True)
    assert app.max_connections == 100000
    assert app.max_client_events_per_second == 1000
    assert app.enable_client_messages and app.enable_user_authentication
    assert app.allowed_origins == ("*",)
    assert app.idempotency.enabled and app.idempotency.ttl_seconds == 300  # the app's policy.idempotency
    # [event_limits], [channel_limits] and [presence] are every app's defaults:
    assert app.max_event_payload_in_kb == 100
    assert (app.max_event_channels_at_once, app.max_event_name_length, app.max_event_batch_size) == (100, 200, 10)
    assert app.max_channel_name_length == 200
    assert (app.max_presence_members_per_channel, app.max_presence_member_size_in_kb) == (100, 2)


def test_sockudos_shipped_toml_loads_with_its_settings_applied() -> None:
    config = load_config(SHIPPED_TOML, env={})
    _assert_shipped_settings(config)
    assert config.connection_recovery.enabled and config.history.enabled
    assert config.apps[0].connection_recovery.enabled
    assert config.websocket_max_messages == 1000
    assert config.cors.credentials and "http://localhost:3001" in config.cors.origin  # [cors]
    assert config.push.queue_driver == "memory"
    assert config.webhooks.retry.max_attempts == 5

    warnings = config.warnings
    assert len(warnings) == len(set(warnings)), "one warning per setting"
    named = " ".join(warnings)
    for setting in ("config: mode ", "delta_compression", "[0].policy.channels.channel_namespaces",
                    "ai_transport", "presence.update_rate_limit_per_member_per_second",
                    "push.circuit_breaker", "queue.reliability", "cleanup", "history.writer_shards"):
        assert setting in named, setting
    # Settings of drivers that are not selected, and features switched off, have no effect in
    # Sockudo either: no warning.
    for quiet in ("adapter.nats", "adapter.kafka", "database.surrealdb", "unix_socket", "ably_compat",
                  "queue.redis", "app_manager.cache", "enable_socket_counting", "path_prefix",
                  "websocket.max_bytes", "cors"):  # applied: the outbound byte bound, the CORS headers
        assert quiet not in named, quiet


def test_sockudos_shipped_json_loads_the_same() -> None:
    config = load_config(SHIPPED_JSON, env={})
    _assert_shipped_settings(config)
    assert not config.apps[0].connection_recovery.enabled  # the JSON file's app turns it off
    assert "config: delta_compression has no effect here: delta compression is not implemented" in config.warnings
    assert config.cors.origin == ("*",) and config.cors.credentials  # [cors] as the JSON file has it


# -- applied under another name -----------------------------------------------------------------


def test_global_limits_are_app_defaults_and_an_app_limit_wins(write: Callable[..., str]) -> None:
    path = write("""
[event_limits]
max_payload_in_kb = 50
max_batch_size = 3
[channel_limits]
max_name_length = 64
[presence]
max_members_per_channel = 7

[[app_manager.array.apps]]
id = "1"
key = "k1"
secret = "s"
[app_manager.array.apps.policy.limits]
max_event_payload_in_kb = 20

[[app_manager.array.apps]]
id = "2"
key = "k2"
secret = "s"
""")
    first, second = load_config(path, env={}).apps
    assert first.max_event_payload_in_kb == 20 and second.max_event_payload_in_kb == 50
    for app in (first, second):
        limits = (app.max_event_batch_size, app.max_channel_name_length, app.max_presence_members_per_channel)
        assert limits == (3, 64, 7)
    (env_app,) = load_config(path, env={"SOCKUDO_DEFAULT_APP_ID": "9"}).apps
    assert env_app.max_event_payload_in_kb == 50  # the environment's app gets them too


def test_sockudo_redis_settings_become_the_redis_connection(write: Callable[..., str]) -> None:
    path = write("""
[adapter]
driver = "redis"
[adapter.cluster_health]
heartbeat_interval_ms = 1500
node_timeout_ms = 6000
[database.redis]
host = "10.0.0.5"
port = 6380
db = 2
password = "p@ss"
[instance]
process_id = "node-a"
[queue]
driver = "redis"
""")
    config = load_config(path, env={})
    assert config.adapter_driver == "redis"
    assert config.redis_url == "redis://:p%40ss@10.0.0.5:6380/2"
    assert (config.heartbeat_interval, config.node_timeout) == (1.5, 6.0)
    assert config.node_id == "node-a"
    assert config.webhooks.queue_driver == "redis"


def test_sockudo_sentinels_are_host_port_tables(write: Callable[..., str]) -> None:
    path = write("""
[adapter]
driver = "redis"
[database.redis]
name = "primary"
password = "master-pass"
db = 3
sentinel_password = "sp"
sentinels = [{ host = "s1", port = 26379 }, { host = "s2", port = 26380 }]
""")
    config = load_config(path, env={})
    assert config.redis_sentinels == ("s1:26379", "s2:26380")
    assert config.redis_sentinel_master == "primary"
    assert (config.redis_password, config.redis_db, config.redis_sentinel_password) == ("master-pass", 3, "sp")


def test_redis_settings_without_a_redis_driver_only_warn(write: Callable[..., str]) -> None:
    config = load_config(write('[adapter]\ndriver = "local"\n[database.redis]\nhost = "redis"\nport = 6379\n'), env={})
    assert config.redis_url is None and config.adapter_driver == "local"
    assert "database.redis.host/port has no effect here" in " ".join(config.warnings)


def test_our_redis_url_wins_over_sockudo_host_and_port(write: Callable[..., str]) -> None:
    path = write('[adapter]\ndriver = "redis"\n[database.redis]\nurl = "redis://10.0.0.9:6379/0"\nhost = "other"\n')
    config = load_config(path, env={})
    assert config.redis_url == "redis://10.0.0.9:6379/0"
    assert "config: database.redis.host is overridden by database.redis.url" in config.warnings


def test_an_adapter_this_server_lacks_warns_and_falls_back(write: Callable[..., str]) -> None:
    text = '[adapter]\ndriver = "nats"\n[adapter.nats]\nservers = ["nats://x:4222"]\n'
    config = load_config(write(text), env={})
    assert config.adapter_driver == "local"
    assert "adapter.driver = 'nats' has no effect here" in " ".join(config.warnings)
    assert "adapter.nats has no effect here" in " ".join(config.warnings)  # its settings: the driver is selected
    config = load_config(write(text), env={"REDIS_URL": "redis://127.0.0.1:6399/0"})
    assert config.adapter_driver == "redis"


def test_a_rate_limiter_driver_this_server_lacks_counts_in_memory(write: Callable[..., str]) -> None:
    config = load_config(write('[rate_limiter]\nenabled = true\ndriver = "none"\n'), env={})
    assert (config.rate_limiter.enabled, config.rate_limiter.driver) == (True, "memory")
    assert "rate_limiter.driver = 'none' has no effect here" in " ".join(config.warnings)


def test_the_redis_cluster_rate_limiter_counts_on_the_cluster(write: Callable[..., str]) -> None:
    text = '[rate_limiter]\nenabled = true\ndriver = "redis-cluster"\n'
    config = load_config(write(text), env={"REDIS_CLUSTER_NODES": "10.0.0.1:7000"})
    assert (config.rate_limiter.driver, config.adapter_driver) == ("redis", "redis-cluster")
    assert config.warnings == ()
    with pytest.raises(ConfigError, match="REDIS_CLUSTER_NODES"):
        load_config(write(text), env={})


def test_sockudo_redis_cluster_adapter_settings(write: Callable[..., str]) -> None:
    text = """
[adapter]
driver = "redis-cluster"
[adapter.cluster]
nodes = ["redis://10.0.0.1:7000", "rediss://10.0.0.2:7001"]
prefix = "cl_"
request_timeout_ms = 3000
use_connection_manager = true
use_sharded_pubsub = true
[database.redis.cluster]
password = "s3cret"
"""
    config = load_config(write(text), env={})
    assert config.adapter_driver == "redis-cluster"
    assert config.redis_cluster_nodes == ("10.0.0.1:7000", "10.0.0.2:7001")
    assert (config.redis_prefix, config.requests_timeout_ms) == ("cl_", 3000)
    assert (config.redis_password, config.redis_tls) == ("s3cret", True)
    assert config.warnings == ()


def test_sockudo_cluster_nodes_tables_and_an_unselected_cluster_adapter(write: Callable[..., str]) -> None:
    text = """
[adapter]
driver = "local"
[adapter.cluster]
nodes = ["redis://10.0.0.1:7000"]
prefix = "ignored_"
[database.redis]
cluster_nodes = [{host = "10.0.0.3", port = 7002}, {host = "10.0.0.4", port = 7003}]
"""
    config = load_config(write(text), env={})
    assert config.adapter_driver == "local"
    assert config.redis_prefix == "sockudo_adapter:"  # [adapter.cluster] only counts with its driver
    assert config.redis_cluster_nodes == ("10.0.0.3:7002", "10.0.0.4:7003")


def test_cluster_nodes_from_the_environment_select_the_cluster_adapter(write: Callable[..., str]) -> None:
    env = {"REDIS_CLUSTER_NODES": "10.0.0.1:7000, 10.0.0.2:7001", "REDIS_URL": "redis://10.0.0.9:6379/0"}
    config = load_config(None, env=env)
    assert config.adapter_driver == "redis-cluster"
    assert config.redis_cluster_nodes == ("10.0.0.1:7000", "10.0.0.2:7001")
    with pytest.raises(ConfigError, match="host:port"):
        load_config(None, env={"REDIS_CLUSTER_NODES": "10.0.0.1"})
    with pytest.raises(ConfigError, match="redis-cluster.*needs"):
        load_config(None, env={"ADAPTER_DRIVER": "redis-cluster"})


def test_the_queue_redis_url(write: Callable[..., str]) -> None:
    config = load_config(write('[queue]\ndriver = "redis"\n[queue.redis]\nurl_override = "redis://10.0.0.7:6379/1"\n'
                               'concurrency = 5\n'), env={"REDIS_CLUSTER_NODES": "10.0.0.1:7000"})
    assert (config.queue_redis_url, config.webhooks.queue_driver) == ("redis://10.0.0.7:6379/1", "redis")
    config = load_config(None, env={"QUEUE_REDIS_URL": "redis://10.0.0.8:6379/0"})
    assert config.queue_redis_url == "redis://10.0.0.8:6379/0" and config.adapter_driver == "local"
    with pytest.raises(ConfigError, match="QUEUE_REDIS_URL"):
        load_config(None, env={"QUEUE_REDIS_URL": "http://x"})
    # on the cluster alone the RQ queues have no Redis
    with pytest.raises(ConfigError, match="one Redis for RQ"):
        load_config(write('[webhooks]\nqueue_driver = "redis"\n'), env={"REDIS_CLUSTER_NODES": "10.0.0.1:7000"})


def test_lambda_webhooks_are_left_out_with_a_warning(write: Callable[..., str]) -> None:
    path = write("""
[[app_manager.array.apps]]
id = "1"
key = "k"
secret = "s"
[[app_manager.array.apps.policy.webhooks]]
lambda_function = "on-event"
event_types = ["channel_occupied"]
[[app_manager.array.apps.policy.webhooks]]
url = "https://hooks.example.com/pusher"
event_types = ["channel_occupied"]
""")
    config = load_config(path, env={})
    assert [w.url for w in config.apps[0].webhooks] == ["https://hooks.example.com/pusher"]
    assert "policy.webhooks[0] has no effect here: AWS Lambda" in " ".join(config.warnings)


def test_push_settings_under_sockudo_names(write: Callable[..., str]) -> None:
    path = write('[push]\ncredential_encryption_key = "env://MY_PUSH_KEY"\n[push.retry]\njitter = false\n')
    config = load_config(path, env={"MY_PUSH_KEY": "k" * 44})
    assert config.push.credentials_key == "k" * 44
    assert config.push.retry.jitter_ratio_percent == 0
    with pytest.raises(ConfigError, match="MY_PUSH_KEY"):
        load_config(path, env={})


def test_our_own_key_wins_over_its_sockudo_name(write: Callable[..., str]) -> None:
    path = write('[webhooks]\nqueue_driver = "memory"\n[queue]\ndriver = "redis"\n')
    config = load_config(path, env={})
    assert config.webhooks.queue_driver == "memory"
    assert "config: queue.driver is overridden by webhooks.queue_driver" in config.warnings


def test_translation_reports_instead_of_logging() -> None:
    translated = translate({"mode": "production", "presence": {"max_members_per_channel": 5}}, env={})
    assert translated.document == {}
    assert translated.app_defaults == {"max_presence_members_per_channel": (5, "presence.max_members_per_channel")}
    assert translated.warnings == ["config: mode has no effect here: no development/production switch here; "
                                   "every check applies in both"]


# -- unknown keys stay errors -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("[presence]\nmax_member_per_channel = 1\n",
     'unknown key presence.max_member_per_channel (did you mean "max_members_per_channel"?)'),
    ('[queue]\ndrivr = "redis"\n', 'unknown key queue.drivr (did you mean "driver"?)'),
    ('[adapter.nats]\nserver = ["nats://x"]\n', 'unknown key adapter.nats.server (did you mean "servers"?)'),
    ("actvity_timeout = 5\n", 'unknown key actvity_timeout (did you mean "activity_timeout"?)'),
    ("[websocket]\nmax_frames = 1\n", "unknown key websocket.max_frames"),
    ("[delta_compresion]\nenabled = false\n", 'unknown key delta_compresion (did you mean "delta_compression"?)'),
    ("[database.redis]\nhots = \"x\"\n", 'unknown key database.redis.hots (did you mean "host"?)'),
    ("presence = 5\n", "config: presence must be a table"),
    ('[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n[app_manager.array.apps.policy.limits]\n'
     "max_conections = 1\n", 'app_manager.array.apps[0].max_conections (did you mean "max_connections"?)'),
    ('[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n[app_manager.array.apps.policy.extras]\n'
     "x = 1\n", "unknown key app_manager.array.apps[0].policy.extras"),
])
def test_keys_neither_server_knows_are_errors(write: Callable[..., str], text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(text), env={})
    assert message in str(info.value)


def test_sockudos_camel_case_aliases_are_known(write: Callable[..., str]) -> None:
    text = ("[database.redis.cluster]\nuseTLS = false\n[database.redis.sentinel_tls]\nacceptInvalidCerts = false\n"
            "[database.redis.master_tls]\nacceptInvalidCerts = false\n")
    assert load_config(write(text), env={}).redis_tls is False


def test_a_json_file_is_read_as_json_with_null_as_unset(write: Callable[..., str]) -> None:
    path = write(json.dumps({"port": 7100, "logging": None, "presence": {"max_members_per_channel": 9}}),
                 name="sockudo.json")
    config = load_config(path, env={})
    assert config.port == 7100 and config.apps[0].max_presence_members_per_channel == 9
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write("{port", name="bad.json"), env={})


def test_the_configuration_page_lists_every_catalogue_entry() -> None:
    page = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = page[page.index("## Sockudo config files"):page.index("## Validation")]
    prefix = "app_manager.array.apps[]."
    missing = [path for path in CATALOGUE if f"`{path.removeprefix(prefix)}`" not in section]
    assert missing == []
    for entry in CATALOGUE.values():
        if entry.effect == IGNORED:
            assert entry.note in section, entry.path
