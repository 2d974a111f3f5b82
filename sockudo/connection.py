"""Per-socket state the handler keeps, and the transport interface it talks through.

Pure: the server edge supplies a ``Transport``; the handler never touches a socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from .config import AppConfig
from .wsframe import OutFrame


class Transport(Protocol):
    """What the handler needs from a socket. Both calls must never block."""

    def send(self, frame: OutFrame) -> None:
        """Queue a frame; a full queue disconnects the client (4100), never blocks."""

    def close(self, code: int, reason: str) -> None:
        """Send the close frame after what is already queued, then drop the socket."""


class Connection:
    """One WebSocket client. Slots keep 10,000 idle connections cheap."""

    __slots__ = (
        "socket_id",
        "app",
        "transport",
        "protocol",
        "channels",
        "user_id",
        "user_info",
        "signed_in",
        "watchlist",
        "last_activity",
        "ping_sent_at",
        "auth_deadline",
        "event_window_start",
        "event_window_count",
        "closed",
    )

    def __init__(self, socket_id: str, app: AppConfig, transport: Transport, protocol: int, now: float) -> None:
        self.socket_id = socket_id
        self.app = app
        self.transport = transport
        self.protocol = protocol
        # channel name -> presence user_id (None for non-presence channels)
        self.channels: dict[str, str | None] = {}
        self.user_id: str | None = None
        self.user_info: Any = None
        self.signed_in = False
        self.watchlist: tuple[str, ...] = ()
        self.last_activity = now
        self.ping_sent_at: float | None = None
        self.auth_deadline: float | None = None
        self.event_window_start = 0.0
        self.event_window_count = 0
        self.closed = False

    def send(self, frame: OutFrame) -> None:
        if not self.closed:
            self.transport.send(frame)

    def send_text(self, text: str) -> None:
        if not self.closed:
            self.transport.send(OutFrame(text))
