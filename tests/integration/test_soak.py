"""The soak's CI variant (issue 9): ``tests/soak.py`` for ``SOAK_CI_SECONDS`` (default 120 s).

The issue asks for 3 minutes; 120 s keeps this change's integration modules under their
4-minute budget in ``make test``. ``SOAK_CI_SECONDS=180`` runs the issue's length, and
``make soak`` the full 30 minutes (``SOAK_SECONDS``).
"""

from __future__ import annotations

import os

from tests import soak

SECONDS = float(os.environ.get("SOAK_CI_SECONDS", "120"))


def test_churn_soak_returns_every_bookkeeping_to_empty_and_rss_to_baseline() -> None:
    figures = soak.run(SECONDS)
    counts = figures["counts"]
    # The load really happened (a stuck driver would pass the emptiness checks trivially).
    assert counts["connections"] >= SECONDS * 5, counts
    assert counts["presence_joins"] >= SECONDS, counts
    assert counts["publishes"] >= SECONDS * 10, counts
