"""The REST API's CORS headers per ``[cors]``."""

from __future__ import annotations

import pytest

from sockudo.config.cors import CorsConfig, parse_cors
from sockudo.core.errors import ConfigError
from sockudo.http_api.common import cors_headers


def test_the_default_grants_any_origin_without_credentials() -> None:
    headers = dict(cors_headers(CorsConfig(), "https://app.example"))
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


def test_a_list_echoes_only_its_own_origins() -> None:
    cors = parse_cors({"origin": ["https://app.example"], "methods": ["GET", "POST"]})
    assert dict(cors_headers(cors, "https://app.example"))["Access-Control-Allow-Origin"] == "https://app.example"
    other = dict(cors_headers(cors, "https://evil.example"))
    assert "Access-Control-Allow-Origin" not in other and other["Vary"] == "Origin"
    assert other["Access-Control-Allow-Methods"] == "GET, POST"


def test_credentials_never_pair_with_a_wildcard() -> None:
    headers = dict(cors_headers(parse_cors({"origin": ["*"], "credentials": True}), "https://app.example"))
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_an_empty_origin_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cors.origin"):
        parse_cors({"origin": []})
