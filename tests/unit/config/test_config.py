"""Configuration loading: defaults, TOML, ${VAR} interpolation, environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sockudo.config import AppConfig, load_config
from sockudo.core.errors import ConfigError

TwoApps = """
port = 7000

[[app_manager.array.apps]]
id = "100"
key = "key-100"
secret = "secret-100"
enable_client_messages = true

[[app_manager.array.apps]]
id = "200"
key = "key-200"
secret = "secret-200"
"""


@pytest.fixture
def toml(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def _error(path: str | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


# -- defaults -------------------------------------------------------------------


def test_defaults_without_a_file_serve_the_builtin_app() -> None:
    config = load_config(None, env={})
    assert config.port == 6001
    assert config.host == "0.0.0.0"
    assert config.activity_timeout == 120
    assert config.pong_timeout == 30
    assert config.metrics.enabled and config.metrics.port == 9601
    assert len(config.apps) == 1
    app = config.apps[0]
    assert (app.id, app.key, app.secret) == ("app-id", "app-key", "app-secret")
    assert app.enabled
    assert app.enable_client_messages


def test_unset_app_limits_fall_back_to_pusher_defaults() -> None:
    app = AppConfig(id="1", key="k", secret="s")
    assert app.max_connections == 0  # unlimited
    assert not app.enable_client_messages
    assert app.max_channel_name_length == 200
    assert app.max_event_name_length == 200
    assert app.max_event_payload_in_kb == 10
    assert app.max_event_channels_at_once == 100
    assert app.max_event_batch_size == 10
    assert app.max_presence_members_per_channel == 100


# -- TOML -------------------------------------------------------------------------


def test_toml_file_with_apps(toml: Callable[[str], str]) -> None:
    config = load_config(toml(TwoApps), env={})
    assert config.port == 7000
    assert [a.id for a in config.apps] == ["100", "200"]
    assert config.apps[0].enable_client_messages
    assert not config.apps[1].enable_client_messages
    assert config.apps[1].key == "key-200" and config.apps[1].secret == "secret-200"


def test_interpolation_of_vars_and_defaults(toml: Callable[[str], str]) -> None:
    path = toml(
        """
port = ${SOCK_PORT}
host = "${SOCK_HOST:-127.0.0.1}"
activity_timeout = ${SOCK_TIMEOUT:-45}

[[app_manager.array.apps]]
id = "${APP_ID}"
key = "${APP_KEY:-fallback-key}"
secret = "${APP_SECRET}"
"""
    )
    config = load_config(path, env={"SOCK_PORT": "7100", "APP_ID": "9", "APP_SECRET": "s3cr3t", "SOCK_TIMEOUT": ""})
    assert config.port == 7100
    assert config.host == "127.0.0.1"
    assert config.activity_timeout == 45  # an empty variable takes the default, as in a shell
    app = config.apps[0]
    assert (app.id, app.key, app.secret) == ("9", "fallback-key", "s3cr3t")


def test_set_variable_wins_over_its_default(toml: Callable[[str], str]) -> None:
    path = toml('host = "${SOCK_HOST:-127.0.0.1}"\n')
    assert load_config(path, env={"SOCK_HOST": "10.0.0.1"}).host == "10.0.0.1"


def test_unresolved_variable_fails_naming_it(toml: Callable[[str], str]) -> None:
    message = _error(toml('[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "${MY_APP_SECRET}"\n'))
    assert "MY_APP_SECRET" in message


def test_invalid_toml_fails(toml: Callable[[str], str]) -> None:
    assert "TOML" in _error(toml("port = = 1\n"))


def test_missing_file_fails(tmp_path: Path) -> None:
    assert "cannot read" in _error(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('port = "abc"\n', "port"),
        ("activity_timeout = 1.5\n", "activity_timeout"),
        ('debug = "maybe"\n', "debug"),
        ("port = true\n", "port"),
        ('[metrics]\nport = "x"\n', "metrics.port"),
        ('[websocket]\nmax_messages = "lots"\n', "websocket.max_messages"),
        (
            '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\nmax_connections = "x"\n',
            "app_manager.array.apps[0].max_connections",
        ),
        (
            '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\nenable_client_messages = "sure"\n',
            "app_manager.array.apps[0].enable_client_messages",
        ),
        (
            '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\nallowed_origins = 5\n',
            "app_manager.array.apps[0].allowed_origins",
        ),
    ],
)
def test_wrong_types_fail_naming_the_key(toml: Callable[[str], str], text: str, key: str) -> None:
    assert key in _error(toml(text))


def test_negative_numbers_fail(toml: Callable[[str], str]) -> None:
    assert "max_connections" in _error(toml("max_connections = -1\n"))


def test_numbers_and_booleans_as_strings_are_accepted(toml: Callable[[str], str]) -> None:
    path = toml(
        """
port = "7001"
activity_timeout = " 60 "

[[app_manager.array.apps]]
id = 100
key = "k"
secret = "s"
max_connections = "5"
max_event_payload_in_kb = "20.5"
enable_client_messages = "true"
"""
    )
    config = load_config(path, env={})
    assert config.port == 7001
    assert config.activity_timeout == 60
    app = config.apps[0]
    assert app.id == "100"  # numeric ids become strings
    assert app.max_connections == 5
    assert app.max_event_payload_in_kb == 20.5
    assert app.enable_client_messages is True


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[websocket]\nmax_frames = 1\n", "websocket.max_frames"),
        ("[metrics]\nportt = 1\n", "metrics.portt"),
        (
            '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\nmax_conections = 1\n',
            "app_manager.array.apps[0].max_conections",
        ),
    ],
)
def test_unknown_keys_fail_naming_the_key(toml: Callable[[str], str], text: str, key: str) -> None:
    assert key in _error(toml(text))


@pytest.mark.parametrize("missing", ["id", "key", "secret"])
def test_app_without_id_key_or_secret_fails(toml: Callable[[str], str], missing: str) -> None:
    fields = {"id": '"1"', "key": '"k"', "secret": '"s"'}
    del fields[missing]
    body = "".join(f"{k} = {v}\n" for k, v in fields.items())
    assert f"app_manager.array.apps[0].{missing}" in _error(toml("[[app_manager.array.apps]]\n" + body))


def test_nested_policy_limits_are_flattened(toml: Callable[[str], str]) -> None:
    path = toml(
        """
[[app_manager.array.apps]]
id = "1"
key = "k"
secret = "s"

[app_manager.array.apps.policy.limits]
max_connections = "7"
max_presence_members_per_channel = 3

[app_manager.array.apps.policy.features]
enable_client_messages = true
enable_user_authentication = true
"""
    )
    app = load_config(path, env={}).apps[0]
    assert app.max_connections == 7
    assert app.max_presence_members_per_channel == 3
    assert app.enable_client_messages
    assert app.enable_user_authentication


def test_unknown_key_inside_policy_fails(toml: Callable[[str], str]) -> None:
    text = (
        '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
        "[app_manager.array.apps.policy.limits]\nmax_x = 1\n"
    )
    assert "max_x" in _error(toml(text))


def test_allowed_origins_as_list_or_csv(toml: Callable[[str], str]) -> None:
    path = toml(
        """
[[app_manager.array.apps]]
id = "1"
key = "k1"
secret = "s"
allowed_origins = ["https://a.example.com", "b.example.com"]

[[app_manager.array.apps]]
id = "2"
key = "k2"
secret = "s"
allowed_origins = "https://*.example.com, http://localhost:3000"
"""
    )
    apps = load_config(path, env={}).apps
    assert apps[0].allowed_origins == ("https://a.example.com", "b.example.com")
    assert apps[1].allowed_origins == ("https://*.example.com", "http://localhost:3000")


@pytest.mark.parametrize("field", ["id", "key"])
def test_duplicate_app_ids_or_keys_fail(toml: Callable[[str], str], field: str) -> None:
    first = {"id": "1", "key": "k1", "secret": "s"}
    second = {"id": "2", "key": "k2", "secret": "s"}
    second[field] = first[field]
    text = "".join(
        "[[app_manager.array.apps]]\n" + "".join(f'{k} = "{v}"\n' for k, v in app.items()) for app in (first, second)
    )
    message = _error(toml(text))
    assert first[field] in message and "twice" in message


def test_a_database_app_manager_warns_and_serves_the_file_apps(
    toml: Callable[[str], str],
) -> None:
    config = load_config(toml('[app_manager]\ndriver = "mysql"\n' + TwoApps.replace("port = 7000\n", "")), env={})
    assert [a.id for a in config.apps] == ["100", "200"]
    assert "app_manager.driver = 'mysql' has no effect here" in " ".join(config.warnings)


# -- environment ------------------------------------------------------------------


def test_default_app_env_replaces_the_file_apps(toml: Callable[[str], str]) -> None:
    env = {
        "SOCKUDO_DEFAULT_APP_ID": "env-id",
        "SOCKUDO_DEFAULT_APP_KEY": "env-key",
        "SOCKUDO_DEFAULT_APP_SECRET": "env-s",
    }
    config = load_config(toml(TwoApps), env=env)
    assert [(a.id, a.key, a.secret) for a in config.apps] == [("env-id", "env-key", "env-s")]


def test_default_app_env_without_a_file() -> None:
    env = {
        "SOCKUDO_DEFAULT_APP_ID": "123",
        "SOCKUDO_DEFAULT_APP_KEY": "k",
        "SOCKUDO_DEFAULT_APP_SECRET": "s",
        "SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS": "3",
        "SOCKUDO_DEFAULT_APP_ALLOWED_ORIGINS": "https://a.com,https://b.com",
    }
    (app,) = load_config(None, env=env).apps
    assert (app.id, app.key, app.secret, app.max_connections) == ("123", "k", "s", 3)
    assert app.allowed_origins == ("https://a.com", "https://b.com")


def test_per_field_env_turns_client_messages_off() -> None:
    (app,) = load_config(None, env={"SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES": "false"}).apps
    assert app.key == "app-key"
    assert app.enable_client_messages is False


def test_per_field_env_with_a_bad_value_fails_naming_the_variable() -> None:
    message = _error(None, {"SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS": "many"})
    assert "SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS" in message


def test_unknown_default_app_env_variable_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Sockudo's .env files carry variables we do not implement; they must not stop start-up.
    config = load_config(None, {"SOCKUDO_DEFAULT_APP_COLOUR": "blue"})
    assert [a.id for a in config.apps] == ["app-id"]
    assert "SOCKUDO_DEFAULT_APP_COLOUR" in caplog.text


def test_enabled_false_clears_every_app(toml: Callable[[str], str]) -> None:
    two_apps = ('[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
                '[[app_manager.array.apps]]\nid = "2"\nkey = "k2"\nsecret = "s2"\n')
    assert load_config(toml(two_apps), env={"SOCKUDO_DEFAULT_APP_ENABLED": "false"}).apps == ()


def test_commented_out_variable_is_not_required(toml: Callable[[str], str]) -> None:
    config = load_config(toml('# port = ${NOT_SET_ANYWHERE}\nport = 7000\n'), env={})
    assert config.port == 7000


def test_default_app_enabled_false_clears_apps(toml: Callable[[str], str]) -> None:
    assert load_config(None, env={"SOCKUDO_DEFAULT_APP_ENABLED": "false"}).apps == ()
    one_app = '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
    assert load_config(toml(one_app), env={"SOCKUDO_DEFAULT_APP_ENABLED": "false"}).apps == ()


def test_env_overrides_the_file(toml: Callable[[str], str]) -> None:
    path = toml("port = 7000\nactivity_timeout = 30\n[metrics]\nport = 9700\n")
    config = load_config(path, env={"PORT": "7500", "ACTIVITY_TIMEOUT": "15", "METRICS_PORT": "9800"})
    assert (config.port, config.activity_timeout, config.metrics.port) == (7500, 15, 9800)


def test_empty_env_values_do_not_override(toml: Callable[[str], str]) -> None:
    config = load_config(toml("port = 7000\n"), env={"PORT": ""})
    assert config.port == 7000


def test_bad_env_value_fails_naming_the_key() -> None:
    assert "port" in _error(None, {"PORT": "abc"})
    assert "activity_timeout" in _error(None, {"ACTIVITY_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PORT": "0"}, "port"),
        ({"PORT": "70000"}, "port"),
        ({"METRICS_PORT": "70000"}, "metrics.port"),
        ({"ACTIVITY_TIMEOUT": "0"}, "activity_timeout"),
    ],
)
def test_out_of_range_values_fail(env: dict[str, str], key: str) -> None:
    assert key in _error(None, env)


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


# -- [connection_recovery], [history], [idempotency] -------------------


FeatureApps = """
[connection_recovery]
enabled = true
max_buffer_size = 20

[history]
enabled = true
retention_window_seconds = 3600

[[app_manager.array.apps]]
id = "100"
key = "key-100"
secret = "secret-100"
history = { max_page_size = 10 }
idempotency = { enabled = false }

[[app_manager.array.apps]]
id = "200"
key = "key-200"
secret = "secret-200"
[app_manager.array.apps.connection_recovery]
buffer_ttl_seconds = 30
"""


def test_feature_sections_from_the_file_env_and_per_app_overrides(toml: Callable[[str], str]) -> None:
    env = {"HISTORY_MAX_MESSAGES_PER_CHANNEL": "50", "IDEMPOTENCY_TTL_SECONDS": "30",
           "CONNECTION_RECOVERY_BUFFER_TTL_SECONDS": "90"}
    config = load_config(toml(FeatureApps), env=env)
    assert config.history.retention_window_seconds == 3600 and config.history.max_messages_per_channel == 50
    first, second = config.apps
    # An app's table wins over the global section (file and environment); the rest is inherited.
    history = first.history
    assert (history.enabled, history.max_page_size, history.max_messages_per_channel) == (True, 10, 50)
    assert (first.idempotency.enabled, first.idempotency.ttl_seconds) == (False, 30)
    assert (first.connection_recovery.enabled, first.connection_recovery.buffer_ttl_seconds) == (True, 90)
    assert (second.connection_recovery.buffer_ttl_seconds, second.connection_recovery.max_buffer_size) == (30, 20)
    assert second.history.max_page_size == 100 and second.idempotency.enabled


def test_feature_switches_from_the_environment_alone() -> None:
    config = load_config(None, env={"CONNECTION_RECOVERY_ENABLED": "true", "HISTORY_ENABLED": "1",
                                    "HISTORY_RETENTION_WINDOW_SECONDS": "60", "IDEMPOTENCY_ENABLED": "false"})
    (app,) = config.apps
    assert app.connection_recovery.enabled and app.history.enabled
    assert app.history.retention_window_seconds == 60
    assert not app.idempotency.enabled


@pytest.mark.parametrize(("text", "key"), [
    ("[history]\nmax_page_size = \"many\"\n", "history.max_page_size"),
    ("[[app_manager.array.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nhistory = 3\n", "history"),
])
def test_bad_feature_values_fail_naming_the_key(toml: Callable[[str], str], text: str, key: str) -> None:
    assert key in _error(toml(text))


@pytest.mark.parametrize(("text", "key"), [
    ("[idempotency]\nttl_seconds = 0\n", "idempotency.ttl_seconds"),
    ("[idempotency]\nmax_key_length = 0\n", "idempotency.max_key_length"),
    ("[history]\nmax_page_size = 0\n", "history.max_page_size"),
    ("[history]\nretention_window_seconds = 0\n", "history.retention_window_seconds"),
    ("[history]\nmax_messages_per_channel = -1\n", "history.max_messages_per_channel"),
    ("[connection_recovery]\nmax_buffer_size = 0\n", "connection_recovery.max_buffer_size"),
    ("[connection_recovery]\nbuffer_ttl_seconds = -5\n", "connection_recovery.buffer_ttl_seconds"),
    ("[[app_manager.array.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nidempotency = { ttl_seconds = 0 }\n",
     "idempotency.ttl_seconds"),
])
def test_feature_values_out_of_range_fail(toml: Callable[[str], str], text: str, key: str) -> None:
    """A zero TTL or page size would silently break the feature (Redis refuses EX 0: every keyed
    publish would answer 503), so start-up refuses it."""
    assert key in _error(toml(text))


def test_debug_turns_on_debug_logs_unless_a_level_is_given(toml: Callable[[str], str]) -> None:
    assert load_config(toml("debug = true\n"), env={}).log_level == "DEBUG"
    assert load_config(None, env={"DEBUG": "1"}).log_level == "DEBUG"
    assert load_config(toml('debug = true\n[logging]\nlevel = "WARNING"\n'), env={}).log_level == "WARNING"
    assert load_config(toml("debug = true\n"), env={"LOG_LEVEL": "ERROR"}).log_level == "ERROR"
    assert load_config(toml("debug = false\n"), env={}).log_level == "INFO"
