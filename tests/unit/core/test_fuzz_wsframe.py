"""Hostile bytes fed to ``wsframe.FrameReader``, property-based with hypothesis.

The reader is the first thing an attacker's bytes reach. Whatever arrives — random bytes,
valid streams with bytes flipped or cut, fragments with control frames in between, frames
after a close, a multi-gigabyte length that never comes — it must:

- return a whole text/binary message, a close, or raise one of the three documented outcomes
  (``EOFError``: the peer went away; ``FrameProtocolError`` with 1002: close the socket;
  ``MessageTooBig``: answer 4000, keep the socket) — never ``struct.error``, ``IndexError`` …;
- never ask the socket for more than ``max(max_payload, SKIP_CHUNK)`` bytes at once, so an
  oversize message is skipped in chunks and never buffered whole;
- stay in sync: after an oversize message the next message is read intact.
"""

from __future__ import annotations

import io
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from sockudo.core.wsframe import FrameProtocolError, FrameReader, MessageTooBig
from tests.unit.core.test_wsframe import client_frame

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
SETTINGS = settings(max_examples=300, deadline=None)


frame = client_frame  # RFC 6455 §5.2 by hand; ``declared`` lies about the length


class Socket:
    """``read(n)`` returns between 1 and ``n`` bytes, as the chunk plan says (b"" at EOF), and
    remembers the largest request."""

    def __init__(self, data: bytes, chunks: list[int]) -> None:
        self.buf = io.BytesIO(data)
        self.chunks = chunks or [1 << 30]
        self.i = 0
        self.largest = 0

    def read(self, n: int) -> bytes:
        self.largest = max(self.largest, n)
        size = self.chunks[self.i % len(self.chunks)]
        self.i += 1
        return self.buf.read(max(1, min(n, size)))


def drain(data: bytes, chunks: list[int], max_payload: int, limit: int = 200) -> tuple[list[object], Socket, list]:
    """Read messages until the stream ends or the connection would be closed; returns the
    outcomes (``(opcode, payload)``, ``"too_big"``, ``"eof"`` or the protocol error)."""
    sock = Socket(data, chunks)
    pings: list[tuple[int, bytes]] = []
    reader = FrameReader(sock.read, max_payload, on_ping=lambda p: pings.append((PING, p)),
                         on_pong=lambda p: pings.append((PONG, p)))
    outcomes: list[object] = []
    for _ in range(limit):
        try:
            opcode, payload = reader.read_message()
        except MessageTooBig:
            outcomes.append("too_big")
            continue
        except EOFError:
            outcomes.append("eof")
            break
        except FrameProtocolError as exc:
            assert exc.close_code == 1002, exc.close_code
            outcomes.append(exc)
            break
        assert opcode in (TEXT, BINARY, CLOSE), opcode
        assert opcode == CLOSE or len(payload) <= max_payload
        outcomes.append((opcode, payload))
        if opcode == CLOSE:
            break
    assert sock.largest <= max(max_payload, FrameReader.SKIP_CHUNK), sock.largest
    return outcomes, sock, pings


chunk_plans = st.lists(st.integers(min_value=1, max_value=70_000), max_size=6)
max_payloads = st.sampled_from([16, 125, 1024, 65536])


@SETTINGS
@given(st.binary(max_size=3000), chunk_plans, max_payloads)
def test_random_bytes_end_in_a_documented_outcome(data, chunks, max_payload):
    drain(data, chunks, max_payload)


@SETTINGS
@given(st.binary(min_size=2, max_size=40), chunk_plans, max_payloads)
def test_masked_random_headers(data, chunks, max_payload):
    """Random bytes after a first byte with the mask bit set get past the masking check more
    often, reaching the length and opcode paths."""
    head = bytes([data[0], data[1] | 0x80])
    drain(head + data[2:], chunks, max_payload)


messages = st.lists(st.tuples(st.sampled_from([TEXT, BINARY]), st.binary(max_size=300),
                              st.integers(min_value=1, max_value=4)), max_size=6)
controls = st.lists(st.tuples(st.sampled_from([PING, PONG]), st.binary(max_size=125)), max_size=3)


@SETTINGS
@given(messages, st.lists(controls, min_size=8, max_size=8), chunk_plans)
def test_fragments_with_control_frames_between_them_reassemble(msgs, control_sets, chunks):
    stream = b""
    expected_controls: list[tuple[int, bytes]] = []
    for index, (opcode, payload, pieces) in enumerate(msgs):
        cuts = sorted({len(payload) * k // pieces for k in range(1, pieces)})
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, part in enumerate(parts):
            stream += frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1)
            if i < len(parts) - 1:  # control frames may come between fragments (RFC 6455 §5.4)
                for control in control_sets[index % len(control_sets)]:
                    stream += frame(*control)
                    expected_controls.append(control)
    stream += frame(CLOSE, struct.pack("!H", 1000)) + b"after the close frame"
    outcomes, _, pings = drain(stream, chunks, 65536)
    assert outcomes == [(o, p) for o, p, _ in msgs] + [(CLOSE, struct.pack("!H", 1000))]
    assert pings == expected_controls


@SETTINGS
@given(st.lists(st.tuples(st.binary(max_size=200), st.integers(min_value=1, max_value=3)), min_size=1, max_size=8),
       st.sampled_from([16, 64, 100]), chunk_plans)
def test_oversize_messages_are_skipped_and_the_reader_stays_in_sync(msgs, max_payload, chunks):
    stream = b""
    for payload, pieces in msgs:
        step = max(1, len(payload) // pieces)
        parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        for i, part in enumerate(parts):
            stream += frame(TEXT if i == 0 else CONT, part, fin=i == len(parts) - 1)
    outcomes, _, _ = drain(stream, chunks, max_payload)
    expected = [("too_big" if len(p) > max_payload else (TEXT, p)) for p, _ in msgs] + ["eof"]
    assert outcomes == expected


@SETTINGS
@given(st.integers(min_value=70_000, max_value=(1 << 63) - 1), st.integers(min_value=0, max_value=300_000),
       st.lists(st.integers(min_value=512, max_value=70_000), max_size=6))
def test_a_huge_declared_length_is_never_buffered(declared, sent, chunks):
    """A multi-megabyte (or exabyte) length with only part of the payload sent: the reader skips
    what arrives in bounded chunks and reports EOF; it never asks for the declared size."""
    data = frame(TEXT, b"", declared=declared) + os.urandom(min(sent, declared - 1))
    outcomes, sock, _ = drain(data, chunks, 65536)
    assert outcomes == ["eof"]
    assert sock.largest <= FrameReader.SKIP_CHUNK


@SETTINGS
@given(messages, st.data())
def test_mutated_valid_streams_end_in_a_documented_outcome(msgs, data):
    stream = b"".join(frame(o, p) for o, p, _ in msgs) + frame(PING, b"x") + frame(CLOSE, b"")
    if not stream:
        return
    mutated = bytearray(stream)
    for _ in range(data.draw(st.integers(min_value=1, max_value=5))):
        i = data.draw(st.integers(min_value=0, max_value=len(mutated) - 1))
        mutated[i] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(mutated)))
    drain(bytes(mutated[:cut]), data.draw(chunk_plans), data.draw(max_payloads))


@SETTINGS
@given(st.sampled_from([TEXT, BINARY]), st.sampled_from([TEXT, BINARY, 0x3, 0x7, 0xB, 0xF]), st.binary(max_size=20))
def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(first, second, payload):
    stream = frame(first, payload, fin=False) + frame(second, payload)
    outcomes, _, _ = drain(stream, [], 1024)
    assert len(outcomes) == 1 and isinstance(outcomes[0], FrameProtocolError)


def test_close_in_the_middle_of_a_fragmented_message_is_returned() -> None:
    stream = frame(TEXT, b"half", fin=False) + frame(CLOSE, struct.pack("!H", 1001)) + frame(CONT, b"never")
    outcomes, _, _ = drain(stream, [], 1024)
    assert outcomes == [(CLOSE, struct.pack("!H", 1001))]


def test_control_frames_may_not_be_fragmented_or_long() -> None:
    for bad in (frame(PING, b"x", fin=False), frame(PONG, b"p" * 126), frame(CLOSE, b"c" * 200)):
        outcomes, _, _ = drain(bad, [], 1024)
        assert len(outcomes) == 1 and isinstance(outcomes[0], FrameProtocolError), outcomes


@SETTINGS
@given(st.binary(max_size=10))
def test_the_close_reply_is_always_a_code_that_may_travel(payload):
    """Found by the live fuzzer: a client's close code 1 (or 999, or 5000) was echoed back."""
    from sockudo.core.wsframe import reply_close_code

    code = reply_close_code(payload)
    assert 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999, (payload, code)
    if len(payload) >= 2:
        sent = struct.unpack("!H", payload[:2])[0]
        valid = 1000 <= sent <= 1003 or 1007 <= sent <= 1014 or 3000 <= sent <= 4999
        try:
            payload[2:].decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        assert code == (sent if valid and utf8 else 1007 if valid else 1002)
    else:
        assert code == (1000 if not payload else 1002)
