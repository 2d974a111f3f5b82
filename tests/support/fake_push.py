"""Local fake push providers that check what the real ones check.

- :class:`FakeAPNs`: HTTP/2 over TLS (ALPN ``h2``, a self-signed certificate made here with
  ``cryptography``; the server under test trusts it through ``push.ca_file``), served with the
  ``h2`` library. Verifies the ES256 provider token (``kid``, ``iss``, ``iat`` age) against the
  configured key and the ``apns-*`` headers; answers with APNs's JSON ``{"reason": …}`` errors.
- :class:`FakeFCM`: HTTP/1.1; its OAuth token endpoint verifies the RS256 service-account
  assertion (``iss``, ``scope``, ``aud``, ``exp``) and issues bearer tokens; ``messages:send``
  accepts only those tokens and checks the v1 message shape (string ``data`` values, ``token``).
- :class:`FakeWebPush`: HTTP/1.1 push service; verifies the VAPID ``Authorization: vapid t=…, k=…``
  (ES256 signature with ``k``, ``aud`` = the endpoint's origin, ``exp`` ≤ 24 h, ``sub``) and the
  ``aes128gcm`` headers, and keeps the encrypted bodies for the test to decrypt.

Every fake can be scripted per token (``script``) or taken down (``down``), and counts accepted
deliveries per token. Like the real services across the internet, every answer takes ``delay``
seconds (default :data:`LATENCY_S`, 100 ms; requests wait concurrently, never behind each other),
and at most ``max_concurrency`` requests are served at once: beyond it the fake answers 429
(``TooManyRequests``, ``Retry-After: busy_retry_after``). The fake APNs also advertises
``max_concurrency`` as its HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS``, as Apple does.
"""

from __future__ import annotations

import datetime
import heapq
import ipaddress
import itertools
import json
import os
import re
import select
import socket
import ssl
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sockudo.push import crypto
from tests.support import push_crypto

Reply = tuple[int, Any, dict[str, str]]  # status, JSON body (or None), headers

LATENCY_S = 0.1  # a provider's answer time across the internet (50–300 ms in practice)
MAX_CONCURRENCY = 1000


def self_signed_cert(directory: str) -> tuple[str, str]:
    """A certificate for localhost / 127.0.0.1; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    label = f"fake-{uuid.uuid4().hex[:8]}"  # several fakes may share a directory and a CA bundle
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"localhost ({label})")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, f"{label}.crt"), os.path.join(directory, f"{label}.key")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


class _FakeServerH2(h2.connection.H2Connection):
    """The fakes' server side of ``h2``, lean like a real provider's: HPACK without Huffman
    coding, and the open-inbound-stream count (asked for each request) from the fake's own
    tables instead of a scan of every stream (h2's scan still runs every 64th time, forgetting
    closed streams). The fakes share the machine with the workers they measure."""

    counted: Any = None  # () -> streams open (receiving, or waiting out the delay)
    _asked = 0

    @property
    def open_inbound_streams(self) -> int:
        self._asked += 1
        if self.counted is None or self._asked % 64 == 0:
            return self._open_streams(int(not self.config.client_side))
        return int(self.counted())


class _PlainEncoder(hpack.Encoder):
    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Scripted:
    """Per-token scripted replies, an outage switch, a response delay, delivery bookkeeping."""

    def __init__(self, *, delay: float = LATENCY_S, max_concurrency: int = MAX_CONCURRENCY) -> None:
        self.lock = threading.Lock()
        self.scripts: dict[str, list[Reply]] = defaultdict(list)
        self.down = False
        self.delay = delay
        self.max_concurrency = max_concurrency
        self.busy_retry_after = "1"
        self.in_flight = 0
        self.peak_in_flight = 0
        self.throttled = 0  # requests answered 429 for being over max_concurrency
        self.accepted: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.requests: dict[str, list[float]] = defaultdict(list)  # token → request times
        self.auth_failures = 0
        self.bad_requests: list[str] = []

    def enter(self) -> bool:
        """Count a request in; False (answer 429) when ``max_concurrency`` are already in."""
        with self.lock:
            if self.in_flight >= self.max_concurrency:
                self.throttled += 1
                return False
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return True

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def busy_reply(self) -> Reply:
        return (429, {"reason": "TooManyRequests"}, {"retry-after": self.busy_retry_after})

    # -- HTTP/2 over TLS (APNs; FCM when given a certificate directory) --

    def listen_h2(self, cert_dir: str) -> None:
        """Serve HTTP/2 over TLS (ALPN ``h2``, a self-signed certificate at ``cert_path``);
        every request goes to ``self._handle(headers, body)``."""
        self.cert_path, key_path = self_signed_cert(cert_dir)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(self.cert_path, key_path)
        self.tls.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def _handle(self, headers: dict[str, str], body: bytes) -> Reply:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self.closed:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = self.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        if sock.selected_alpn_protocol() != "h2":  # APNs speaks HTTP/2 only
            sock.close()
            return
        with self.lock:
            self.connections += 1
        conn = _FakeServerH2(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.encoder = _PlainEncoder()
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrency}
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        streams: dict[int, dict[str, Any]] = {}
        due: list[tuple[float, int, int, Reply, bool]] = []  # answers waiting out the delay (a heap)
        conn.counted = lambda: len(streams) + len(due)
        order = itertools.count()
        try:
            while True:
                wait = max(0.0, due[0][0] - time.monotonic()) if due else None
                if sock.pending() or select.select([sock], [], [], wait)[0]:
                    data = sock.recv(65535)
                    if not data:
                        return
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            streams[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                        elif isinstance(event, h2.events.DataReceived):
                            streams[event.stream_id]["body"] += event.data
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            stream = streams.pop(event.stream_id)
                            counted = self.enter()
                            if counted:
                                reply = self._handle(stream["headers"], stream["body"])
                            else:
                                status, rbody, rheaders = self.busy_reply()
                                reply = (status, rbody, {**rheaders, "apns-id": str(uuid.uuid4())})
                            entry = (time.monotonic() + self.delay, next(order), event.stream_id, reply, counted)
                            heapq.heappush(due, entry)
                while due and due[0][0] <= time.monotonic():
                    _, _, stream_id, (status, body, headers), counted = heapq.heappop(due)
                    if counted:
                        self.leave()
                    payload = json.dumps(body).encode() if body is not None else b""
                    response_headers = [(":status", str(status)), *headers.items()]
                    if payload:
                        response_headers.append(("content-type", "application/json"))
                    conn.send_headers(stream_id, response_headers, end_stream=not payload)
                    if payload:
                        conn.send_data(stream_id, payload, end_stream=True)
                sock.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            return
        finally:
            for entry in due:
                if entry[4]:
                    self.leave()
            sock.close()

    def script(self, token: str, replies: Iterable[Reply]) -> None:
        with self.lock:
            self.scripts[token].extend(replies)

    def next_reply(self, token: str) -> Reply | None:
        with self.lock:
            self.requests[token].append(time.time())
            if self.down:
                return (503, {"reason": "ServiceUnavailable"}, {})
            if self.scripts.get(token):
                return self.scripts[token].pop(0)
        return None

    def record(self, token: str, item: dict[str, Any]) -> None:
        with self.lock:
            self.accepted[token].append(item)

    def accepted_count(self, token: str) -> int:
        with self.lock:
            return len(self.accepted.get(token, ()))

    def total_accepted(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.accepted.values())


# -- APNs --------------------------------------------------------------------------------------

APNS_PUSH_TYPES = {
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "location",
    "pushtotalk",
    "widgets",
    "controls",
}


class FakeAPNs(_Scripted):
    def __init__(
        self,
        *,
        team_id: str,
        key_id: str,
        public_key: ec.EllipticCurvePublicKey,
        topic: str,
        cert_dir: str,
        delay: float = LATENCY_S,
        max_concurrency: int = MAX_CONCURRENCY,
    ) -> None:
        super().__init__(delay=delay, max_concurrency=max_concurrency)
        self.team_id, self.key_id, self.public_key, self.topic = team_id, key_id, public_key, topic
        self.jwts_seen: set[str] = set()
        self.verified: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.listen_h2(cert_dir)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _handle(self, headers: dict[str, str], body: bytes) -> Reply:
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        out = {"apns-id": apns_id}
        match = re.fullmatch(r"/3/device/([0-9a-fA-F]+)", headers.get(":path", ""))
        if headers.get(":method") != "POST":
            return (405, {"reason": "MethodNotAllowed"}, out)
        if match is None:
            return (400, {"reason": "BadDeviceToken"}, out)
        token = match.group(1)
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            self.auth_failures += 1
            return (403, {"reason": "MissingProviderToken"}, out)
        jwt = auth[7:]
        verified = self.verified.get(jwt)  # like APNs, a token is verified once, not per request
        if verified is None:
            try:
                verified = push_crypto.jwt_verify(jwt, self.public_key)
            except crypto.CryptoError:
                self.auth_failures += 1
                return (403, {"reason": "InvalidProviderToken"}, out)
            self.verified[jwt] = verified
        header, claims = verified
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            self.auth_failures += 1
            return (403, {"reason": "InvalidProviderToken"}, out)
        iat = claims.get("iat")
        if not isinstance(iat, int) or iat > time.time() + 60:
            self.auth_failures += 1
            return (403, {"reason": "InvalidProviderToken"}, out)
        if time.time() - iat > 3600:
            return (403, {"reason": "ExpiredProviderToken"}, out)
        self.jwts_seen.add(jwt)
        if "apns-topic" not in headers:
            return (400, {"reason": "MissingTopic"}, out)
        if headers["apns-topic"] != self.topic:
            return (400, {"reason": "TopicDisallowed"}, out)
        if headers.get("apns-push-type", "alert") not in APNS_PUSH_TYPES:
            return (400, {"reason": "InvalidPushType"}, out)
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return (400, {"reason": "BadPriority"}, out)
        if "apns-expiration" in headers and not headers["apns-expiration"].isdigit():
            return (400, {"reason": "BadExpirationDate"}, out)
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return (400, {"reason": "BadCollapseId"}, out)
        try:
            uuid.UUID(apns_id)
        except ValueError:
            return (400, {"reason": "BadMessageId"}, out)
        if len(body) > 4096:
            return (413, {"reason": "PayloadTooLarge"}, out)
        try:
            payload = json.loads(body)
        except ValueError:
            return (400, {"reason": "PayloadEmpty"}, out)
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return (400, {"reason": "PayloadEmpty"}, out)
        reply = self.next_reply(token)
        if reply is not None:
            status, rbody, rheaders = reply
            return (status, rbody, {**out, **rheaders})
        self.record(token, {"apns_id": apns_id, "payload": payload, "headers": headers})
        return (200, None, out)


# -- HTTP/1.1 fakes ----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a worker opening its pool's connections at once must not see SYNs dropped


def _serve(handler_cls: type[BaseHTTPRequestHandler]) -> _Server:
    server = _Server(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: Any = None
    # One write per response (flushed after each request) and no Nagle: otherwise headers and
    # body go out as two segments and delayed ACKs add ~40 ms to every keep-alive request.
    wbufsize = 65536
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return None

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _answer(self, handle: Any) -> None:
        """``handle()`` → the reply, sent after the fake's delay; 429 beyond its concurrency."""
        fake = self.fake
        if not fake.enter():
            time.sleep(fake.delay)
            return self._reply(*fake.busy_reply())
        try:
            reply = handle()
            time.sleep(fake.delay)
        finally:
            fake.leave()
        return self._reply(*reply)

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if payload:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class FakeFCM(_Scripted):
    SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

    def __init__(
        self,
        *,
        project_id: str = "demo-project",
        client_email: str = "push@demo-project.iam.example",
        delay: float = LATENCY_S,
        max_concurrency: int = MAX_CONCURRENCY,
        cert_dir: str | None = None,
    ) -> None:
        """With ``cert_dir``, ``messages:send`` is served over HTTP/2 with TLS (as Google serves
        it; ``url`` is then https and ``cert_path`` the certificate to trust); the OAuth token
        endpoint stays HTTP/1.1."""
        super().__init__(delay=delay, max_concurrency=max_concurrency)
        self.project_id, self.client_email = project_id, client_email
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = uuid.uuid4().hex
        self.issued: dict[str, float] = {}
        self.token_requests = 0
        fake = self

        class Handler(_Handler):
            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                self._answer(lambda: self.route(body))

            def route(self, body: bytes) -> Reply:
                if self.path == "/token":
                    return fake.token(body)
                match = re.fullmatch(r"/v1/projects/([^/]+)/messages:send", self.path)
                if match is None:
                    return (404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "no route"}}, {})
                return fake.send(match.group(1), self.headers.get("authorization", ""), body)

        Handler.fake = fake

        self.server = _serve(Handler)
        self.http_port = self.port = self.server.server_address[1]
        self.h2 = cert_dir is not None
        if cert_dir is not None:
            self.listen_h2(cert_dir)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}" if self.h2 else f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.h2:
            super().close()

    def _handle(self, headers: dict[str, str], body: bytes) -> Reply:
        match = re.fullmatch(r"/v1/projects/([^/]+)/messages:send", headers.get(":path", ""))
        if match is None:
            return (404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "no route"}}, {})
        return self.send(match.group(1), headers.get("authorization", ""), body)

    def service_account(self) -> dict[str, Any]:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "token_uri": f"http://127.0.0.1:{self.http_port}/token",
        }

    def token(self, body: bytes) -> Reply:
        with self.lock:
            self.token_requests += 1
        form = parse_qs(body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or not form.get("assertion"):
            return (400, {"error": "unsupported_grant_type"}, {})
        try:
            header, claims = push_crypto.jwt_verify(form["assertion"][0], self.key.public_key())
        except crypto.CryptoError:
            self.auth_failures += 1
            return (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, {})
        now = time.time()
        if (
            claims.get("iss") != self.client_email
            or claims.get("aud") != f"http://127.0.0.1:{self.http_port}/token"
            or self.SCOPE not in str(claims.get("scope", "")).split()
            or header.get("kid") != self.key_id
            or not isinstance(claims.get("exp"), int)
            or not isinstance(claims.get("iat"), int)
            or claims["exp"] <= now
            or claims["exp"] - claims["iat"] > 3600
        ):
            self.auth_failures += 1
            return (400, {"error": "invalid_grant", "error_description": "Invalid JWT claims."}, {})
        token = "ya29." + uuid.uuid4().hex
        with self.lock:
            self.issued[token] = now + 3600
        return (200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}, {})

    def send(self, project: str, authorization: str, body: bytes) -> Reply:
        def error(code: int, status: str, message: str, fcm_code: str | None = None) -> Reply:
            details = (
                [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}]
                if fcm_code
                else []
            )
            return (code, {"error": {"code": code, "message": message, "status": status, "details": details}}, {})

        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        with self.lock:
            valid = self.issued.get(token, 0) > time.time()
        if not valid:
            self.auth_failures += 1
            return error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if project != self.project_id:
            return error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")
        try:
            message = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.", "INVALID_ARGUMENT")
        registration = message.get("token")
        if not isinstance(registration, str) or not registration:
            return error(400, "INVALID_ARGUMENT", "Recipient of the message is not set.", "INVALID_ARGUMENT")
        data = message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return error(
                400, "INVALID_ARGUMENT", "Invalid value at 'message.data' (string expected)", "INVALID_ARGUMENT"
            )
        if len(body) > 4096 + 512:
            return error(400, "INVALID_ARGUMENT", "Message is too big", "INVALID_ARGUMENT")
        reply = self.next_reply(registration)
        if reply is not None:
            return reply
        name = f"projects/{self.project_id}/messages/{uuid.uuid4().int % 10**16}"
        self.record(registration, {"name": name, "message": message})
        return (200, {"name": name}, {})

    @staticmethod
    def unregistered() -> Reply:
        return (
            404,
            {
                "error": {
                    "code": 404,
                    "message": "Requested entity was not found.",
                    "status": "NOT_FOUND",
                    "details": [
                        {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}
                    ],
                }
            },
            {},
        )


class FakeWebPush(_Scripted):
    def __init__(
        self, *, vapid_public_key: str, delay: float = LATENCY_S, max_concurrency: int = MAX_CONCURRENCY
    ) -> None:
        super().__init__(delay=delay, max_concurrency=max_concurrency)
        self.vapid_public_key = vapid_public_key.rstrip("=")
        self.verified: dict[str, tuple[str, dict[str, Any]]] = {}  # Authorization → (key, claims) once verified
        self.bodies: dict[str, list[tuple[bytes, dict[str, str]]]] = defaultdict(list)
        fake = self

        class Handler(_Handler):
            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                self._answer(lambda: self.route(body))

            def route(self, body: bytes) -> Reply:
                match = re.fullmatch(r"/push/([A-Za-z0-9_\-]+)", self.path)
                if match is None:
                    return (404, None, {})
                return fake.receive(match.group(1), {k.lower(): v for k, v in self.headers.items()}, body)

        Handler.fake = fake

        self.server = _serve(Handler)
        self.port = self.server.server_address[1]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, subscription_id: str) -> str:
        return f"{self.origin}/push/{subscription_id}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def receive(self, sub: str, headers: dict[str, str], body: bytes) -> Reply:
        authorization = headers.get("authorization", "")
        verified = self.verified.get(authorization)  # a token is verified once, not per request
        if verified is None:
            try:
                token, key = push_crypto.parse_vapid_authorization(authorization)
                public = crypto.p256_public_from_raw(crypto.b64url_decode(key))
                _, claims = push_crypto.jwt_verify(token, public)
            except crypto.CryptoError:
                self.auth_failures += 1
                return (401, None, {})
            verified = self.verified[authorization] = (key, claims)
        key, claims = verified
        now = time.time()
        exp = claims.get("exp")
        if (
            claims.get("aud") != self.origin
            or not isinstance(exp, int)
            or exp <= now
            or exp > now + 86400
            or not str(claims.get("sub", "")).startswith(("mailto:", "https:"))
        ):
            self.auth_failures += 1
            return (403, None, {})
        if key.rstrip("=") != self.vapid_public_key:  # the subscription was made for another server key
            self.auth_failures += 1
            return (403, None, {})
        if headers.get("content-encoding") != "aes128gcm" or "ttl" not in headers or not headers["ttl"].isdigit():
            self.bad_requests.append(sub)
            return (400, None, {})
        if len(body) > 4096 + 103:
            return (413, None, {})
        reply = self.next_reply(sub)
        if reply is not None:
            return reply
        message_id = uuid.uuid4().hex
        with self.lock:
            self.bodies[sub].append((body, headers))
        self.record(sub, {"id": message_id})
        return (201, None, {"location": f"{self.origin}/message/{message_id}"})


def web_subscription() -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """A browser's subscription keys: (private key, p256dh b64url, auth b64url)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, crypto.b64url(crypto.p256_public_raw(key)), crypto.b64url(os.urandom(16))
