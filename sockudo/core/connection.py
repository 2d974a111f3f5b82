"""Per-socket state the handler keeps, and the transport interface it talks through.

Pure: the server edge supplies a ``Transport``; the handler never touches a socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from sockudo.config import AppConfig
from sockudo.core.wsframe import OutFrame


class Transport(Protocol):
    """What the handler needs from a socket. Both calls must never block."""

    def send(self, frame: OutFrame) -> None:
        """Queue a frame; a full queue disconnects the client (4100), never blocks."""

    def close(self, code: int, reason: str) -> None:
        """Send the close frame after what is already queued, then drop the socket."""

    def pending_bytes(self) -> int:
        """Bytes accepted but not yet handed to the kernel: how far behind the client is."""


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
        "held",
        "attach_serials",
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
        # While a subscribe waits on the cluster, broadcasts to this socket are held here so
        # that the subscription ack always comes before the channel's events.
        self.held: list[OutFrame] | None = None
        # protocol 2: channel -> newest serial when this socket subscribed (for until_attach)
        self.attach_serials: dict[str, int] | None = None

    def send(self, frame: OutFrame) -> None:
        """Deliver a broadcast (held while a subscription is being acknowledged)."""
        if self.closed:
            return
        held = self.held
        if held is not None:
            held.append(frame)
        else:
            self.transport.send(frame)

    def send_text(self, text: str) -> None:
        """A direct reply to this socket; never held."""
        if not self.closed:
            self.transport.send(OutFrame(text))

    def hold(self) -> None:
        if self.held is None:
            self.held = []

    def release(self, delivered: dict[str, int] | None = None) -> None:
        """Send the held broadcasts; ``delivered`` maps channel -> the newest serial already
        replayed to this socket, so a message replayed by a resume is not sent twice."""
        held, self.held = self.held, None
        if held and not self.closed:
            for frame in held:
                if delivered and frame.serial is not None and frame.serial <= delivered.get(frame.channel or "", -1):
                    continue
                self.transport.send(frame)
