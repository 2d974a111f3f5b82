"""Signing in to the console: one access token, then a session cookie with a CSRF token.

The token is ``[console] token`` / ``CONSOLE_TOKEN``, or a random one made at start-up (printed
once on the terminal, never logged). It is compared in constant time (``hmac.compare_digest``).
A successful sign-in gets a random session id (the cookie: ``HttpOnly``, ``SameSite=Strict``)
and a random CSRF token that every action must echo in a header; the page reads it from
``GET <path>/api/session``, which a cross-site page cannot read. Sessions live in this
process's memory, bounded in number and age: restarting the server signs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TTL_SECONDS = 12 * 3600
DEFAULT_MAX_SESSIONS = 64
# Wrong tokens allowed per window, all addresses together; beyond, sign-in is refused without
# looking at the token until the window has room again (guessing stays slow).
MAX_FAILURES = 20
FAILURE_WINDOW_SECONDS = 60.0


def generate_token() -> str:
    return secrets.token_urlsafe(24)


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected value never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires_at: float


class Throttled(Exception):
    """Too many wrong tokens lately: sign-in is refused for now."""


class Sessions:
    def __init__(self, token: str, clock: Callable[[], float] = time.time, ttl: float = DEFAULT_TTL_SECONDS,
                 limit: int = DEFAULT_MAX_SESSIONS, max_failures: int = MAX_FAILURES) -> None:
        if not token:
            raise ValueError("the console needs a non-empty access token")
        self.token = token
        self.clock = clock
        self.ttl = ttl
        self.limit = max(1, limit)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.max_failures = max_failures
        self._failures: deque[float] = deque()

    def sign_in(self, given: str | None) -> Session | None:
        """A new session if ``given`` is the access token, else None. Raises ``Throttled`` after
        ``max_failures`` wrong tokens within ``FAILURE_WINDOW_SECONDS``."""
        now = self.clock()
        while self._failures and self._failures[0] <= now - FAILURE_WINDOW_SECONDS:
            self._failures.popleft()
        if len(self._failures) >= self.max_failures:
            raise Throttled("too many wrong tokens; try again in a minute")
        if not same(given, self.token):
            self._failures.append(now)
            return None
        self._expire()
        while len(self._sessions) >= self.limit:
            self._sessions.popitem(last=False)  # the oldest sign-in goes first
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock() + self.ttl)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            self._sessions.pop(session_id, None)
            return None
        return session

    def sign_out(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return same(given, session.csrf)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]
