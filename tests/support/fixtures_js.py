"""pytest fixture for the real pusher-js client harness.

Import from ``tests/conftest.py``::

    from tests.support.fixtures_js import pusherjs  # noqa: F401

(or list ``"tests.support.fixtures_js"`` in ``pytest_plugins``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    from .pusherjs import PusherJsClient, PusherJsDriver, PusherJsError
except ImportError:  # imported as a top-level module (tests/support on sys.path)
    from pusherjs import PusherJsClient, PusherJsDriver, PusherJsError  # type: ignore[no-redef,import-not-found]

__all__ = ["pusherjs", "PusherJsClient", "PusherJsDriver", "PusherJsError"]


@pytest.fixture
def pusherjs(request: pytest.FixtureRequest) -> Iterator[PusherJsDriver]:
    """A fresh pusher-js driver process for this test; killed afterwards.

    On failure the driver's stderr tail is attached to the report as a section.
    """
    driver = PusherJsDriver()
    try:
        yield driver
    finally:
        tail = driver.stderr_tail()
        driver.close()
        if tail:
            request.node.add_report_section("teardown", "pusher-js driver stderr", tail)
