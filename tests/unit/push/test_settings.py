"""``[push]`` configuration: defaults, TOML + environment, errors naming the key."""

from __future__ import annotations

import pytest

from sockudo.config import load_config
from sockudo.core.errors import ConfigError
from sockudo.push.settings import parse_settings


def test_defaults_and_environment_overrides() -> None:
    assert parse_settings({}).publish_status_ttl_days == 30
    settings = parse_settings(
        {"batch_size": 50, "retry": {"max_attempts": 3}},
        {
            "PUSH_CREDENTIALS_KEY": "s3cr3t-key",
            "APNS_ENDPOINT": "https://api.sandbox.push.apple.com",
            "PUSH_RETRY_INITIAL_BACKOFF_MS": "250",
            "PUSH_ALLOW_INSECURE_ENDPOINTS": "true",
        },
    )
    assert settings.credentials_key == "s3cr3t-key" and "s3cr3t" not in repr(
        settings
    )  # the key never shows in reprs/logs
    assert settings.apns_endpoint == "https://api.sandbox.push.apple.com"
    assert settings.batch_size == 50 and settings.retry.max_attempts == 3 and settings.retry.initial_backoff_ms == 250
    assert settings.allow_insecure_endpoints
    assert parse_settings({}, {"PUSH_CREDENTIAL_ENCRYPTION_KEY": "legacy"}).credentials_key == "legacy"


@pytest.mark.parametrize(
    ("raw", "env", "key"),
    [
        ({"batch_size": 0}, {}, "push.batch_size"),
        ({"batch_size": "many"}, {}, "push.batch_size"),
        ({"queue_driver": "kafka"}, {}, "push.queue_driver"),
        ({"nope": 1}, {}, "push.nope"),
        ({"retry": {"max_attempts": 0}}, {}, "push.retry.max_attempts"),
        ({}, {"PUSH_RETRY_MAX_BACKOFF_MS": "1"}, "push.retry.max_backoff_ms"),
        ({"apns_endpoint": "ftp://x"}, {}, "push.apns_endpoint"),
        ({"allow_insecure_endpoints": "maybe"}, {}, "push.allow_insecure_endpoints"),
        ({"queue_driver": "redis"}, {}, "push.queue_driver"),
    ],
)
def test_invalid_values_name_the_key(raw: dict[str, object], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_settings(raw, env)


def test_push_section_in_the_config_file(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "c.toml"
    path.write_text("[push]\nbatch_size = 20\n[push.retry]\nmax_attempts = 2\n")
    config = load_config(str(path), {})
    assert config.push.batch_size == 20 and config.push.retry.max_attempts == 2
    path.write_text("[push]\nlease_ms = 1\n")
    with pytest.raises(ConfigError, match="push.lease_ms"):
        load_config(str(path), {})


def test_pure_push_modules_import_no_io_libraries() -> None:
    """settings, model, status, retry and crypto stay sans-I/O (conventions: dependency direction)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import sockudo.push.settings, sockudo.push.model, sockudo.push.status, sockudo.push.retry\n"
        "import sockudo.push.crypto, sockudo.config\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'gevent', 'flask', 'httpx', 'redis', 'rq', 'workers'}))\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
