"""RFC 6455 framing: reading masked client frames from a byte stream, encoding server frames."""

from __future__ import annotations

import io
import os
import struct
from typing import Any

import pytest

from sockudo.core import wsframe
from sockudo.core.wsframe import FrameProtocolError, FrameReader, MessageTooBig, OutFrame

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0, mask: bytes | None = None,
    declared: int | None = None,
) -> bytes:
    """A client frame built by hand, per RFC 6455 §5.2 (independent of the code under test);
    ``declared`` lies about the length."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if declared is None else declared
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 1 << 16:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    key = mask if mask is not None else os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Stream:
    """An in-memory socket: ``read(n)`` returns at most ``chunk`` bytes, and records sizes asked for."""

    def __init__(self, data: bytes, chunk: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self.chunk = chunk
        self.requests: list[int] = []

    def read(self, n: int) -> bytes:
        self.requests.append(n)
        return self._buf.read(min(n, self.chunk) if self.chunk else n)


def reader(data: bytes, max_payload: int = 65536, chunk: int | None = None, **kw: Any) -> tuple[FrameReader, Stream]:
    stream = Stream(data, chunk)
    return FrameReader(stream.read, max_payload, **kw), stream


# -- reading ------------------------------------------------------------------------


def test_reads_a_masked_text_message() -> None:
    r, _ = reader(client_frame(TEXT, b'{"event":"pusher:ping"}'))
    assert r.read_message() == (TEXT, b'{"event":"pusher:ping"}')


def test_reads_a_message_delivered_one_byte_at_a_time() -> None:
    payload = "héllo wörld".encode()
    r, _ = reader(client_frame(TEXT, payload) + client_frame(BINARY, b"\x00\x01"), chunk=1)
    assert r.read_message() == (TEXT, payload)
    assert r.read_message() == (BINARY, b"\x00\x01")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_reads_every_length_encoding(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    r, _ = reader(client_frame(TEXT, payload), max_payload=100_000)
    assert r.read_message() == (TEXT, payload)


def test_reassembles_fragmented_messages_with_control_frames_between() -> None:
    pings: list[bytes] = []
    pongs: list[bytes] = []
    data = (
        client_frame(TEXT, b"Hel", fin=False)
        + client_frame(PING, b"are you there")
        + client_frame(CONT, b"lo ", fin=False)
        + client_frame(PONG, b"yes")
        + client_frame(CONT, b"world")
        + client_frame(TEXT, b"next")
    )
    r, _ = reader(data, on_ping=pings.append, on_pong=pongs.append)
    assert r.read_message() == (TEXT, b"Hello world")
    assert pings == [b"are you there"]
    assert pongs == [b"yes"]
    assert r.read_message() == (TEXT, b"next")


def test_ping_without_callback_is_skipped() -> None:
    r, _ = reader(client_frame(PING, b"x") + client_frame(TEXT, b"after"))
    assert r.read_message() == (TEXT, b"after")


def test_close_frame_is_returned_with_its_code() -> None:
    r, _ = reader(client_frame(CLOSE, struct.pack("!H", 1001) + b"bye"))
    opcode, payload = r.read_message()
    assert opcode == CLOSE
    assert wsframe.close_code_of(payload) == 1001
    assert wsframe.close_code_of(b"") is None


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    r, _ = reader(client_frame(TEXT, b"hi", masked=False))
    with pytest.raises(FrameProtocolError) as info:
        r.read_message()
    assert info.value.close_code == 1002


@pytest.mark.parametrize(
    "data",
    [
        client_frame(TEXT, b"x", rsv=4),  # RSV1 without an extension
        client_frame(CONT, b"x"),  # continuation with nothing to continue
        client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"),  # new message inside a fragmented one
        client_frame(PING, b"x" * 126),  # control frame over 125 bytes
        client_frame(PING, b"x", fin=False),  # fragmented control frame
        client_frame(0x3, b"x"),  # reserved opcode
    ],
)
def test_malformed_frames_are_protocol_errors(data: bytes) -> None:
    r, _ = reader(data)
    with pytest.raises(FrameProtocolError) as info:
        r.read_message()
    assert info.value.close_code == 1002


def test_eof_mid_frame_raises_eof() -> None:
    r, _ = reader(client_frame(TEXT, b"hello")[:-2])
    with pytest.raises(EOFError):
        r.read_message()
    r, _ = reader(b"")
    with pytest.raises(EOFError):
        r.read_message()


def test_oversize_message_is_skipped_without_buffering_then_reading_continues() -> None:
    limit = 1024
    big = os.urandom(300_000)
    r, stream = reader(client_frame(TEXT, big) + client_frame(TEXT, b"still here"), max_payload=limit)
    with pytest.raises(MessageTooBig):
        r.read_message()
    # Never asked the socket for the whole payload: it was skipped in bounded chunks.
    assert max(stream.requests) <= FrameReader.SKIP_CHUNK < len(big)
    assert r.read_message() == (TEXT, b"still here")


def test_message_at_the_limit_is_accepted() -> None:
    r, _ = reader(client_frame(TEXT, b"x" * 100), max_payload=100)
    assert r.read_message() == (TEXT, b"x" * 100)


def test_fragmented_message_over_the_limit_in_total_is_rejected() -> None:
    data = (
        client_frame(TEXT, b"a" * 60, fin=False)
        + client_frame(CONT, b"b" * 60, fin=False)
        + client_frame(PING, b"p")
        + client_frame(CONT, b"c" * 10)
        + client_frame(TEXT, b"ok")
    )
    pings: list[bytes] = []
    r, _ = reader(data, max_payload=100, on_ping=pings.append)
    with pytest.raises(MessageTooBig):
        r.read_message()
    assert pings == [b"p"]  # control frames inside the skipped message still count
    assert r.read_message() == (TEXT, b"ok")



@pytest.mark.parametrize("payload", [b"", b"x"], ids=["empty", "one-byte"])
def test_a_message_in_more_fragments_than_max_fragments_is_1009(payload: bytes) -> None:
    """Empty continuation frames add nothing to the payload: only the fragment count stops them."""
    def message(fragments: int) -> bytes:
        return client_frame(TEXT, b"{", fin=False) + client_frame(CONT, payload, fin=False) * (fragments - 2) \
            + client_frame(CONT, b"}")

    r, _ = reader(message(8) + message(9), max_fragments=8)
    assert r.read_message() == (TEXT, b"{" + payload * 6 + b"}")
    with pytest.raises(FrameProtocolError) as info:
        r.read_message()
    assert info.value.close_code == 1009


# -- writing -------------------------------------------------------------------------


def test_outframe_wire_is_encoded_once() -> None:
    frame = OutFrame('{"event":"x"}')
    first = frame.wire
    assert frame.wire is first
    assert first == b"\x81\x0d" + b'{"event":"x"}'


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e" + struct.pack("!H", 126)),
        (65535, b"\x81\x7e" + struct.pack("!H", 65535)),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_outframe_length_headers(size: int, header: bytes) -> None:
    text = "a" * size
    wire = OutFrame(text).wire
    assert wire[: len(header)] == header
    assert wire[len(header) :] == text.encode()


def test_outframe_length_counts_utf8_bytes_not_characters() -> None:
    wire = OutFrame("é" * 100).wire  # 200 bytes: needs the 16-bit form
    assert wire[:4] == b"\x81\x7e" + struct.pack("!H", 200)


def test_server_frames_round_trip_through_a_masking_client() -> None:
    """What we send, re-masked as a client would, reads back identically."""
    wire = OutFrame("x" * 70_000).wire
    assert wire[1] & 0x80 == 0  # servers never mask
    payload = wire[10:]
    r, _ = reader(client_frame(TEXT, payload), max_payload=100_000)
    assert r.read_message() == (TEXT, b"x" * 70_000)


def test_close_frame_encoding() -> None:
    wire = wsframe.encode_close(4201, "Pong reply not received in time")
    assert wire[0] == 0x88
    assert struct.unpack("!H", wire[2:4])[0] == 4201
    assert wire[4:] == b"Pong reply not received in time"
    assert len(wsframe.encode_close(4000, "x" * 500)) <= 127  # control frames stay under 126 bytes of payload
