"""The files a Procfile platform reads agree with each other and with the code (docs/deploy.md):
the Procfile's process types are app.json's formation, .python-version is the Python the project
requires, and conf/heroku.toml turns the Heroku Redis add-on's URL into a TLS client that does
not verify Heroku's self-signed certificate."""

from __future__ import annotations

import json
import ssl
import tomllib

import redis

from sockudo.config import load_config
from sockudo.redis import make_client
from tests.support.procs import ROOT


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text(encoding="utf-8").splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_the_procfile_execs_the_three_processes() -> None:
    assert procfile() == {"web": "exec python -m sockudo", "worker": "exec python -m workers",
                          "push": "exec python -m workers push"}


def test_app_json_describes_the_procfile_and_the_redis_add_on() -> None:
    app = json.loads((ROOT / "app.json").read_text(encoding="utf-8"))
    assert set(app["formation"]) == set(procfile())
    assert app["formation"]["web"]["quantity"] >= 1 and app["formation"]["worker"]["quantity"] >= 1
    assert app["buildpacks"] == [{"url": "heroku/python"}]
    (addon,) = app["addons"]
    assert addon["plan"].startswith("heroku-redis:") and addon["as"] == "SOCKUDO_REDIS"
    assert (ROOT / app["env"]["SOCKUDO_CONFIG"]["value"]).is_file()
    assert app["env"]["SOCKUDO_DEFAULT_APP_ID"]["value"].isdigit()  # the Python SDK's rule
    assert app["env"]["SOCKUDO_DEFAULT_APP_SECRET"]["generator"] == "secret"


def test_python_version_is_the_one_the_project_requires() -> None:
    version = (ROOT / ".python-version").read_text(encoding="utf-8").strip()
    tools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    assert tools["mypy"]["python_version"] == version
    assert tools["ruff"]["target-version"] == "py" + version.replace(".", "")
    assert f"PYTHON ?= python{version}" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_heroku_config_reads_the_add_on_url_over_tls_without_verifying() -> None:
    env = {"SOCKUDO_REDIS_URL": "rediss://:secret@ec2-1-2-3-4.compute-1.amazonaws.com:6380",
           "SOCKUDO_DEFAULT_APP_ID": "12345", "SOCKUDO_DEFAULT_APP_KEY": "k", "SOCKUDO_DEFAULT_APP_SECRET": "s"}
    config = load_config(str(ROOT / "conf" / "heroku.toml"), env=env)
    assert config.adapter_driver == "redis"
    assert [app.id for app in config.apps] == ["12345"]
    pool = make_client(config).connection_pool
    connection = pool.make_connection()
    assert isinstance(connection, redis.SSLConnection)
    assert connection.host == "ec2-1-2-3-4.compute-1.amazonaws.com" and connection.port == 6380
    assert connection.cert_reqs == ssl.CERT_NONE
