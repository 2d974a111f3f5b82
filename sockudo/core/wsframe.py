"""RFC 6455 framing for the server side. Pure: bytes in, frames out.

We read frames ourselves (rather than through gevent-websocket's reader) so that the
payload limit is enforced from the frame header *before* the payload is buffered, WebSocket
pings count as activity, and fragmented, binary and malformed frames get the right close
code. Outbound frames are encoded once per publish and the same bytes go to every socket.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

from sockudo.core.protocol import to_v2

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_MESSAGE_TOO_BIG = 1009


class FrameProtocolError(Exception):
    """The peer broke RFC 6455; close with ``close_code``."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


def encode(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final server frame."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


def encode_text(text: str) -> bytes:
    # "replace": a lone surrogate must never reach here (client JSON is decoded strictly), but
    # if one did, an exception in the writer greenlet would silence the socket for good.
    return encode(OP_TEXT, text.encode("utf-8", "replace"))


def encode_close(code: int, reason: str = "") -> bytes:
    return encode(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])


class OutFrame:
    """One outbound text message, shared by every recipient of a publish.

    ``wire`` is the encoded WebSocket frame, computed on first use and then reused,
    so a fan-out to N sockets encodes once. Protocol-2 sockets get ``wire_v2``: the same
    message with ``sockudo:`` prefixes, a ``message_id`` and, on channels with recovery or
    history, its ``stream_id``/``serial`` — also encoded once, and only if such a socket exists.
    """

    __slots__ = ("text", "_wire", "v2_text", "_wire_v2", "channel", "serial", "meta")

    def __init__(self, text: str, v2_text: str | None = None, channel: str | None = None,
                 serial: int | None = None) -> None:
        self.text = text
        self._wire: bytes | None = None
        self.v2_text = v2_text
        self._wire_v2: bytes | None = None
        self.channel = channel
        self.serial = serial
        # (stream_id, published_ms, message_id) of a sequenced message, for other nodes' buffers
        self.meta: tuple[str, int, str] | None = None

    @property
    def wire(self) -> bytes:
        wire = self._wire
        if wire is None:
            wire = self._wire = encode_text(self.text)
        return wire

    @property
    def wire_v2(self) -> bytes:
        wire = self._wire_v2
        if wire is None:
            wire = self._wire_v2 = encode_text(self.text_v2)
        return wire

    @property
    def text_v2(self) -> str:
        if self.v2_text is None:
            self.v2_text = to_v2(self.text, str(uuid.uuid4()))
        return self.v2_text

    def __repr__(self) -> str:
        return f"OutFrame({self.text!r})"


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR as one big integer: far faster in CPython than a per-byte loop.
    if not payload:
        return payload
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class MessageTooBig(Exception):
    """A message over the limit was skipped (never buffered); the connection can go on."""


class FrameReader:
    """Reads whole messages from a blocking ``read(n)`` callable.

    ``max_payload`` bounds a message (all its fragments). A larger message is skipped
    chunk by chunk as it arrives, never buffered whole, and ``MessageTooBig`` is raised once
    it has been consumed, so the caller can answer with an error and keep the socket.
    ``max_fragments`` bounds the frames one message may be split into: empty or one-byte
    continuation frames add (next to) nothing to the payload, so without it a message could
    go on for ever; one more is ``FrameProtocolError`` 1009. Fragments are joined into one
    buffer as they arrive, so a fragmented message costs its payload bytes, not an object
    per fragment.
    Control frames are handed to ``on_ping`` / ``on_pong``; ``read_message`` returns
    ``(opcode, payload)`` for text or binary messages and ``(OP_CLOSE, payload)`` for close.
    """

    __slots__ = ("_read", "max_payload", "max_fragments", "on_ping", "on_pong")

    SKIP_CHUNK = 65536
    DEFAULT_MAX_FRAGMENTS = 1024

    def __init__(self, read: Callable[[int], bytes], max_payload: int,
                 on_ping: Callable[[bytes], object] | None = None, on_pong: Callable[[bytes], object] | None = None,
                 max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        self._read = read
        self.max_payload = max_payload
        self.max_fragments = max_fragments
        self.on_ping = on_ping
        self.on_pong = on_pong

    def _skip(self, n: int) -> None:
        while n > 0:
            data = self._read(min(n, self.SKIP_CHUNK))
            if not data:
                raise EOFError("connection closed")
            n -= len(data)

    def _exact(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) == n:
            return data
        chunks = [data]
        got = len(data)
        while got < n:
            if not data:
                raise EOFError("connection closed")
            data = self._read(n - got)
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def _frame(self, budget: int) -> tuple[bool, int, bytes | None]:
        """One frame; a data frame longer than ``budget`` is skipped and its payload is None."""
        b1, b2 = self._exact(2)
        fin = bool(b1 & 0x80)
        if b1 & 0x70:
            raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Reserved bits set")
        opcode = b1 & 0x0F
        masked = b2 & 0x80
        length = b2 & 0x7F
        if opcode >= 0x8:
            if not fin or length > 125:
                raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Invalid control frame")
        if length == 126:
            (length,) = struct.unpack("!H", self._exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exact(8))
        if not masked:
            raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Client frames must be masked")
        mask = self._exact(4)
        if opcode < 0x8 and length > budget:
            self._skip(length)
            return fin, opcode, None
        payload = _unmask(self._exact(length), mask) if length else b""
        return fin, opcode, payload

    def read_message(self) -> tuple[int, bytes]:
        opcode: int | None = None
        first: bytes | None = None  # an unfragmented message is returned as read, without a copy
        joined = bytearray()  # the fragments so far, once there is more than one
        fragments = 0
        size = 0
        too_big = False
        while True:
            fin, op, payload = self._frame(-1 if too_big else self.max_payload - size)
            # A control frame's payload is never skipped (at most 125 bytes): ``or b""`` only says so.
            if op == OP_PING:
                if self.on_ping:
                    self.on_ping(payload or b"")
                continue
            if op == OP_PONG:
                if self.on_pong:
                    self.on_pong(payload or b"")
                continue
            if op == OP_CLOSE:
                return OP_CLOSE, payload or b""
            if op in (OP_TEXT, OP_BINARY):
                if opcode is not None:
                    raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Expected a continuation frame")
                opcode = op
            elif op == OP_CONTINUATION:
                if opcode is None:
                    raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Unexpected continuation frame")
            else:
                raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "Unknown opcode")
            fragments += 1
            if fragments > self.max_fragments:
                raise FrameProtocolError(CLOSE_MESSAGE_TOO_BIG,
                                         f"Message in more than {self.max_fragments} fragments")
            if payload is None:
                too_big = True
                first = None
                joined = bytearray()
            elif not too_big:
                size += len(payload)
                if fragments == 1:
                    first = payload
                else:
                    if first is not None:
                        joined += first
                        first = None
                    joined += payload
            if fin:
                if too_big:
                    raise MessageTooBig(f"Message larger than {self.max_payload} bytes")
                return opcode, first if first is not None else bytes(joined)


def close_code_of(payload: bytes) -> int | None:
    if len(payload) >= 2:
        return int(struct.unpack("!H", payload[:2])[0])
    return None


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 §7.4.1 and the IANA registry); 1005/1006/1015 never travel."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def reply_close_code(payload: bytes) -> int:
    """The code to answer a client's close frame with: its own code echoed when valid (RFC 6455 §5.5.1),
    1000 for an empty close, 1002 for an invalid code or a 1-byte payload, 1007 for a reason
    that is not UTF-8 (RFC 6455 §7.1.6). Echoing whatever arrived put invalid codes on the wire."""
    if not payload:
        return CLOSE_NORMAL
    code = close_code_of(payload)
    if code is None or not _valid_close_code(code):
        return CLOSE_PROTOCOL_ERROR
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return CLOSE_INVALID_PAYLOAD
    return code
