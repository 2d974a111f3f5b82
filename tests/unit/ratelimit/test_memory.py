"""The listener's protections, pure parts: ``[rate_limiter]`` / ``[ssl]`` settings, the per-IP
rate limiter and connection counter, and the client address behind proxies."""

from __future__ import annotations

import pytest

from sockudo.config import load_config
from sockudo.config.listener import parse_rate_limiter, parse_ssl
from sockudo.core.errors import ConfigError
from sockudo.ratelimit.memory import ConnectionCounter, RateLimiter, client_ip
from tests.support.fakes import FakeClock


def test_rate_limiter_is_off_by_default_with_sockudos_limits() -> None:
    config = load_config(None, {})
    assert not config.rate_limiter.enabled
    assert (config.rate_limiter.api_max_requests, config.rate_limiter.api_window_seconds) == (100, 60)
    assert (config.rate_limiter.websocket_max_requests, config.rate_limiter.websocket_window_seconds) == (20, 60)
    assert config.rate_limiter.max_connections_per_ip == 0
    assert not config.ssl.enabled
    assert (config.http_header_timeout, config.http_body_timeout) == (10.0, 30.0)
    assert config.apps[0].max_channels_per_connection == 100


def test_sockudos_nested_tables_and_the_environment(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[rate_limiter]\nenabled = true\ndriver = \"memory\"\nmax_connections_per_ip = 7\n"
        "[rate_limiter.api_rate_limit]\nmax_requests = 50\nwindow_seconds = 10\nidentifier = \"api\"\ntrust_hops = 1\n"
        "[rate_limiter.websocket_rate_limit]\nmax_requests = 5\nwindow_seconds = 30\n"
        "[http_api]\nheader_timeout_seconds = 2.5\nbody_timeout_seconds = 0\n"
    )
    config = load_config(str(path), {"RATE_LIMITER_WEBSOCKET_MAX_REQUESTS": "9", "HTTP_API_BODY_TIMEOUT_SECONDS": "4"})
    rl = config.rate_limiter
    assert rl.enabled and rl.max_connections_per_ip == 7
    assert (rl.api_max_requests, rl.api_window_seconds, rl.api_trust_hops) == (50, 10, 1)
    assert (rl.websocket_max_requests, rl.websocket_window_seconds) == (9, 30)  # env wins
    assert (config.http_header_timeout, config.http_body_timeout) == (2.5, 4.0)


@pytest.mark.parametrize(("raw", "named"), [
    ({"enabled": "maybe"}, "rate_limiter.enabled"),
    ({"api_rate_limit": {"max_requests": -1}}, "rate_limiter.api_max_requests"),
    ({"api_rate_limit": {"window_seconds": 0}}, "api_rate_limit.window_seconds"),
    ({"api_rate_limit": {"burst": 3}}, "rate_limiter.api_rate_limit.burst"),
    ({"driver": "redis-cluster"}, "rate_limiter.driver"),
    ({"unknown": 1}, "rate_limiter.unknown"),
])
def test_bad_rate_limiter_values_name_the_key(raw, named) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_rate_limiter(raw, {})


def test_ssl_needs_both_files_when_enabled(tmp_path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert parse_ssl({}, {}).enabled is False
    with pytest.raises(ConfigError, match=r"ssl\.key_path"):
        parse_ssl({"enabled": True, "cert_path": str(cert)}, {})
    with pytest.raises(ConfigError, match=r"ssl\.cert_path .* not a readable file"):
        parse_ssl({}, {"SSL_ENABLED": "1", "SSL_CERT_PATH": str(tmp_path / "missing"), "SSL_KEY_PATH": str(cert)})
    config = parse_ssl({"enabled": True}, {"SSL_CERT_PATH": str(cert), "SSL_KEY_PATH": str(cert)})
    assert (config.cert_path, config.key_path) == (str(cert), str(cert))


def test_the_rate_limiter_allows_the_limit_per_window_then_refuses() -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(3, 60, clock)
    assert [limiter.hit("1.2.3.4")[0] for _ in range(4)] == [True, True, True, False]
    assert limiter.hit("5.6.7.8")[0], "another address has its own budget"
    allowed, remaining, reset = limiter.hit("1.2.3.4")
    assert (allowed, remaining) == (False, 0) and 0 < reset <= 60
    clock.advance(60 + 59)  # most of the way through the next window: the old one weighs little
    assert limiter.hit("1.2.3.4")[0]


def test_the_sliding_window_does_not_allow_a_double_burst_at_the_boundary() -> None:
    clock = FakeClock(59.0)  # the last second of a window
    limiter = RateLimiter(10, 60, clock)
    assert all(limiter.hit("ip")[0] for _ in range(10))
    clock.advance(1.5)  # just into the next window: the previous one still counts almost fully
    assert sum(limiter.hit("ip")[0] for _ in range(10)) <= 1


def test_the_rate_limiter_forgets_the_least_recent_address_beyond_its_bound() -> None:
    limiter = RateLimiter(1, 60, FakeClock(), max_keys=2)
    for ip in ("a", "b", "c"):
        limiter.hit(ip)
    assert len(limiter._counts) == 2 and "a" not in limiter._counts


def test_the_connection_counter_caps_and_releases() -> None:
    counter = ConnectionCounter(2)
    assert counter.acquire("ip") and counter.acquire("ip") and not counter.acquire("ip")
    counter.release("ip")
    assert counter.acquire("ip")
    counter.release("ip")
    counter.release("ip")
    assert counter.open == {}
    unlimited = ConnectionCounter(0)
    assert all(unlimited.acquire("ip") for _ in range(1000))


@pytest.mark.parametrize(("remote", "forwarded", "hops", "expected"), [
    ("10.0.0.1", None, 0, "10.0.0.1"),
    ("10.0.0.1", "6.6.6.6", 0, "10.0.0.1"),  # no trusted proxy: the header is the client's word
    ("10.0.0.1", "6.6.6.6, 1.2.3.4", 1, "1.2.3.4"),  # our proxy appended the real client
    ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.9", 2, "1.2.3.4"),
    ("10.0.0.1", "1.2.3.4", 3, "1.2.3.4"),
])
def test_the_client_address_trusts_only_the_configured_proxies(remote, forwarded, hops, expected) -> None:
    assert client_ip(remote, forwarded, hops) == expected
