"""Drive the real pusher-js client (npm ``pusher-js``) from pytest.

One :class:`PusherJsDriver` is one ``node tests/js/driver.js`` process; it can
hold many named pusher-js clients. Commands go to the driver as JSON lines on
its stdin; everything the clients observe comes back as JSON lines on its
stdout and is collected, in order, by a reader thread. Tests then *wait* for
events with a deadline (a condition variable, never fixed sleeps)::

    with PusherJsDriver() as js:
        alice = js.connect("alice", key="test-key", port=port, secret="test-secret", app_id="123")
        alice.wait_connected()
        alice.subscribe("my-channel")
        alice.wait_event("my-channel", "pusher:subscription_succeeded")
        pusher_client.trigger("my-channel", "my-event", {"x": 1})
        ev = alice.wait_event("my-channel", "my-event")
        assert ev["data"] == {"x": 1}

The event shapes are documented in ``tests/js/README.md``. Every event dict
the wrapper hands out carries ``"_seq"``: its position in the driver's event
stream, usable as ``since=`` to only look at what happened afterwards.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
JS_DIR = REPO_ROOT / "tests" / "js"
DRIVER_JS = JS_DIR / "driver.js"

Predicate = Callable[[dict], bool] | Mapping[str, Any]

#: How many of a client's most recent events a timeout message shows.
RECENT_IN_ERRORS = 40


class PusherJsError(AssertionError):
    """The driver rejected a command (``cmd_error``) or died."""


def _node_binary() -> str:
    for cand in (os.environ.get("NODE"), "/usr/bin/node", shutil.which("node")):
        if cand and os.path.exists(cand):
            return cand
    raise PusherJsError("node not found (set $NODE); the pusher-js harness needs Node >= 18")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _as_predicate(pred: Predicate | None) -> Callable[[dict], bool]:
    if pred is None:
        return lambda ev: True
    if callable(pred):
        return pred
    want = dict(pred)
    return lambda ev: all(k in ev and ev[k] == v for k, v in want.items())


def _fmt(events: Iterable[dict]) -> str:
    lines = []
    for ev in events:
        text = json.dumps(ev, sort_keys=True, default=str)
        lines.append("  " + (text if len(text) <= 600 else text[:600] + "...<truncated>"))
    return "\n".join(lines) if lines else "  (none)"


class PusherJsDriver:
    """One Node process running ``tests/js/driver.js``."""

    def __init__(
        self,
        *,
        node: str | None = None,
        driver_path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        debug: bool | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        driver = Path(driver_path) if driver_path else DRIVER_JS
        if not (JS_DIR / "node_modules" / "pusher-js").is_dir():
            raise PusherJsError(
                f"{JS_DIR}/node_modules/pusher-js is missing: run `npm ci` in {JS_DIR}"
            )
        if debug is None:
            debug = bool(os.environ.get("PUSHERJS_DRIVER_DEBUG"))
        self._debug = debug
        proc_env = dict(os.environ)
        if env:
            proc_env.update(env)
        if debug:
            proc_env["PUSHERJS_DRIVER_DEBUG"] = "1"

        self._cond = threading.Condition()
        self._events: list[dict] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._ids = itertools.count(1)
        self._clients: dict[str, PusherJsClient] = {}
        self._closed = False
        self._eof = False

        self._proc = subprocess.Popen(
            [node or _node_binary(), str(driver)],
            cwd=str(JS_DIR),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=proc_env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_stdout, name="pusherjs-stdout", daemon=True)
        self._err_reader = threading.Thread(target=self._read_stderr, name="pusherjs-stderr", daemon=True)
        self._reader.start()
        self._err_reader.start()
        try:
            self.wait_for(lambda ev: ev.get("type") == "driver_ready", timeout=start_timeout)
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                ev = json.loads(line)
                if not isinstance(ev, dict):
                    raise ValueError("not an object")
            except ValueError:
                ev = {"client": None, "type": "driver_garbage", "line": line}
            with self._cond:
                ev["_seq"] = len(self._events)
                self._events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            line = line.rstrip("\n")
            self._stderr_tail.append(line)
            if self._debug:
                print(f"[pusherjs] {line}", flush=True)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and not self._eof

    def send(self, cmd: dict, *, wait_ack: bool = True, timeout: float = 10.0) -> dict | None:
        """Send one raw command; by default wait for its ``ack`` (or raise on ``cmd_error``).

        The ack only means the driver executed the call on pusher-js; it says
        nothing about the server's answer.
        """
        if self._closed:
            raise PusherJsError("driver is closed")
        cmd = dict(cmd)
        cmd.setdefault("id", next(self._ids))
        line = json.dumps(cmd) + "\n"
        with self._write_lock:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise PusherJsError(f"driver process is gone ({exc}); stderr:\n{self.stderr_tail()}") from exc
        if not wait_ack:
            return None
        cid = cmd["id"]
        ev = self.wait_for(
            lambda e: e.get("id") == cid and e.get("type") in ("ack", "cmd_error"),
            timeout=timeout,
        )
        if ev["type"] == "cmd_error":
            raise PusherJsError(f"driver rejected {cmd.get('cmd')!r} for client {cmd.get('client')!r}: "
                                f"{ev.get('message')}")
        return ev

    def events(self, client: str | None = None, type: str | None = None, since: int = 0) -> list[dict]:
        """Snapshot of collected events (optionally one client's / one type)."""
        with self._cond:
            evs = self._events[since:]
            return [
                e
                for e in evs
                if (client is None or e.get("client") == client) and (type is None or e.get("type") == type)
            ]

    def mark(self) -> int:
        """A cursor for ``since=``: only events collected after this call."""
        with self._cond:
            return len(self._events)

    def wait_for(
        self,
        predicate: Predicate | None,
        timeout: float = 10.0,
        *,
        client: str | None = None,
        since: int = 0,
        desc: str | None = None,
    ) -> dict:
        """First event (in arrival order, at index >= ``since``) matching ``predicate``.

        ``predicate`` is a callable or a dict of key/values the event must
        contain. Waits on a condition variable until a match arrives or the
        deadline passes (AssertionError listing the recent events).
        """
        pred = _as_predicate(predicate)
        deadline = time.monotonic() + timeout
        pos = since
        with self._cond:
            while True:
                while pos < len(self._events):
                    ev = self._events[pos]
                    pos += 1
                    if client is not None and ev.get("client") != client:
                        continue
                    if pred(ev):
                        return ev
                if self._eof:
                    raise PusherJsError(
                        f"driver exited (rc={self._proc.poll()}) while waiting"
                        f"{' for client ' + repr(client) if client else ''}; stderr:\n{self.stderr_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            recent = [e for e in self._events if client is None or e.get("client") == client][-RECENT_IN_ERRORS:]
        what = desc or (getattr(predicate, "__name__", repr(predicate)) if callable(predicate) else repr(predicate))
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}"
            f"{' on client ' + repr(client) if client else ''}; last {len(recent)} events:\n{_fmt(recent)}"
        )

    def assert_no_event(
        self,
        predicate: Predicate | None,
        within: float = 0.5,
        *,
        client: str | None = None,
        since: int | None = None,
    ) -> None:
        """Assert nothing matching ``predicate`` arrives during a bounded observation window.

        This is deliberately a fixed-length wait: absence can only be observed
        for a bounded time. Events already collected (at index >= ``since``,
        default: now) count too.
        """
        start = self.mark() if since is None else since
        pred = _as_predicate(predicate)
        deadline = time.monotonic() + within
        pos = start
        with self._cond:
            while True:
                while pos < len(self._events):
                    ev = self._events[pos]
                    pos += 1
                    if (client is None or ev.get("client") == client) and pred(ev):
                        raise AssertionError(
                            f"unexpected event{' on client ' + repr(client) if client else ''}: "
                            f"{json.dumps(ev, sort_keys=True, default=str)}"
                        )
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    return
                self._cond.wait(remaining)

    def sync(self, timeout: float = 10.0) -> None:
        """Round-trip a no-op through the driver: every earlier command has been executed."""
        self.send({"cmd": "ping"}, timeout=timeout)

    def rest(
        self,
        method: str,
        *args: Any,
        client: str | None = None,
        timeout: float = 10.0,
        **creds: Any,
    ) -> dict:
        """Call the Node server SDK (``pusher`` 5): ``method`` is one of ``trigger``,
        ``triggerBatch``, ``get``, ``post``, ``sendToUser``, ``terminateUserConnections``,
        called with ``args`` as given (e.g. ``"trigger", "ch", "ev", {"x": 1}, {"socket_id": s}``
        or ``"get", {"path": "/channels", "params": {"info": "user_count"}}``).

        Credentials: ``app_id``, ``key``, ``secret``, ``port``, ``host``,
        ``encryption_master_key_base64``, or ``client=`` to borrow a connected client's.
        Returns the ``rest_result`` event: ``{ok, status, body, message?}``, ``body``
        JSON-decoded when possible. An SDK-side validation error raises ``PusherJsError``.
        """
        cmd: dict[str, Any] = {"cmd": "rest", "method": method, "args": list(args)}
        if client is not None:
            cmd["client"] = client
        for k, v in creds.items():
            cmd[_camel(k)] = str(v) if k in ("app_id", "port") else v
        since = self.mark()
        ack = self.send(cmd, timeout=timeout)
        assert ack is not None
        return self.wait_for({"type": "rest_result", "id": ack["id"]}, timeout=timeout, since=since,
                             desc=f"rest {method}")

    # -- clients ------------------------------------------------------------

    def connect(
        self,
        name: str,
        key: str,
        port: int,
        host: str = "127.0.0.1",
        secret: str | None = None,
        app_id: str | None = None,
        user_data: Mapping[str, Any] | None = None,
        forge_auth: bool | list[str] = False,
        **opts: Any,
    ) -> PusherJsClient:
        """Create pusher-js client ``name`` (``new Pusher(key, {...})``). Does not wait for the connection.

        ``user_data``: ``{"user_id", "user_info"}`` for presence channels and/or
        ``{"id", "user_info", "watchlist"}`` for ``signin()`` (``id`` falls back
        to ``user_id``). ``forge_auth``: sign auth with a wrong secret (``True``
        for everything, or a list of channel names, ``"#user"`` for signin).

        Other keyword options are sent camelCased, e.g. ``activity_timeout``,
        ``pong_timeout``, ``unavailable_timeout``,
        ``encryption_master_key_base64``, ``query_protocol`` (replace the
        ``protocol=7`` URL parameter; ``False`` removes it), ``url_query``
        (extra query string), ``auth_fail`` (auth handler errors out),
        ``raw=False`` (no ``raw`` frame events), ``options={...}`` (merged
        verbatim into the pusher-js options).
        """
        cmd: dict[str, Any] = {
            "cmd": "connect",
            "client": name,
            "key": key,
            "host": host,
            "port": int(port),
            "forgeAuth": forge_auth,
        }
        if secret is not None:
            cmd["secret"] = secret
        if app_id is not None:
            cmd["appId"] = str(app_id)
        if user_data is not None:
            cmd["userData"] = dict(user_data)
        for k, v in opts.items():
            cmd[_camel(k)] = v
        client = PusherJsClient(self, name)
        self._clients[name] = client
        self.send(cmd)
        return client

    def client(self, name: str) -> PusherJsClient:
        return self._clients[name]

    # -- lifecycle ----------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                with self._write_lock:
                    proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                    proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._reader.join(timeout=timeout)
        self._err_reader.join(timeout=timeout)

    def __enter__(self) -> PusherJsDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; tests should close explicitly
        try:
            if not self._closed and self._proc.poll() is None:
                self._proc.kill()
        except Exception:
            pass


class PusherJsClient:
    """Handle on one named pusher-js client inside a :class:`PusherJsDriver`."""

    def __init__(self, driver: PusherJsDriver, name: str) -> None:
        self.driver = driver
        self.name = name

    def __repr__(self) -> str:
        return f"PusherJsClient({self.name!r})"

    def _cmd(self, cmd: str, **fields: Any) -> dict | None:
        return self.driver.send({"cmd": cmd, "client": self.name, **fields})

    # -- commands -----------------------------------------------------------

    def subscribe(self, channel: str) -> None:
        """``pusher.subscribe(channel)``; every event on it is reported as ``type: "event"``."""
        self._cmd("subscribe", channel=channel)

    def unsubscribe(self, channel: str) -> None:
        self._cmd("unsubscribe", channel=channel)

    def trigger(self, channel: str, event: str, data: Any) -> bool:
        """``channel.trigger(event, data)`` (a client event). Returns pusher-js's "sent" flag."""
        since = self.driver.mark()
        ack = self._cmd("trigger", channel=channel, event=event, data=data)
        assert ack is not None
        ev = self.driver.wait_for({"type": "triggered", "id": ack["id"]}, timeout=5, since=since, desc="triggered")
        return bool(ev["ok"])

    def signin(self) -> None:
        """``pusher.signin()``, authenticated with the ``user_data`` given at connect."""
        self._cmd("signin")

    def send_raw(self, event: str, data: Any, channel: str | None = None) -> bool:
        """``pusher.send_event(event, data, channel)``: an arbitrary frame through pusher-js."""
        since = self.driver.mark()
        fields: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            fields["channel"] = channel
        ack = self._cmd("send_raw", **fields)
        assert ack is not None
        ev = self.driver.wait_for({"type": "sent", "id": ack["id"]}, timeout=5, since=since)
        return bool(ev["ok"])

    def disconnect(self) -> None:
        self._cmd("disconnect")

    def reconnect(self) -> None:
        """``pusher.connect()`` again after ``disconnect()``."""
        self._cmd("reconnect")

    def set_options(self, **opts: Any) -> None:
        """Change auth behaviour for later auth calls: ``forge_auth``, ``auth_fail``, ``user_data``, ``secret``..."""
        self._cmd("set_options", **{_camel(k): v for k, v in opts.items()})

    def query(self) -> dict:
        """pusher-js's view right now: ``{state, socket_id, channels: {name: {subscribed, members?...}}, user}``."""
        since = self.driver.mark()
        ack = self._cmd("query")
        assert ack is not None
        return self.driver.wait_for({"type": "query_result", "id": ack["id"]}, timeout=5, since=since)

    # -- observation --------------------------------------------------------

    def events(self, type: str | None = None, since: int = 0) -> list[dict]:
        """Snapshot of this client's events so far (optionally of one ``type``)."""
        return self.driver.events(client=self.name, type=type, since=since)

    def mark(self) -> int:
        return self.driver.mark()

    def wait_for(
        self, predicate: Predicate | None, timeout: float = 10.0, *, since: int = 0, desc: str | None = None
    ) -> dict:
        """First event of this client matching ``predicate`` (callable or dict subset)."""
        return self.driver.wait_for(predicate, timeout=timeout, client=self.name, since=since, desc=desc)

    def assert_no_event(self, predicate: Predicate | None, within: float = 0.5, *, since: int | None = None) -> None:
        """No matching event for this client during a bounded ``within``-second observation window."""
        self.driver.assert_no_event(predicate, within=within, client=self.name, since=since)

    def wait_connected(self, timeout: float = 10.0, *, since: int = 0) -> str:
        """Wait for ``connected``; returns the socket id."""
        ev = self.wait_for(lambda e: e.get("type") == "connected", timeout=timeout, since=since, desc="connected")
        return ev["socket_id"]

    @property
    def socket_id(self) -> str | None:
        evs = self.events("connected")
        return evs[-1]["socket_id"] if evs else None

    def wait_state(self, state: str, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for a ``state_change`` into ``state``."""
        return self.wait_for(
            lambda e: e.get("type") == "state" and e.get("current") == state,
            timeout=timeout,
            since=since,
            desc=f"state -> {state!r}",
        )

    def wait_event(self, channel: str, event: str, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for ``event`` emitted by pusher-js on ``channel`` (as an app's ``channel.bind`` would see it)."""
        return self.wait_for(
            lambda e: e.get("type") == "event" and e.get("channel") == channel and e.get("event") == event,
            timeout=timeout,
            since=since,
            desc=f"event {event!r} on channel {channel!r}",
        )

    def wait_message(self, event: str, channel: str | None = None, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for a decoded inbound protocol message (``type: "message"``), e.g. ``pusher:error``."""
        return self.wait_for(
            lambda e: e.get("type") == "message"
            and e.get("event") == event
            and (channel is None or e.get("channel") == channel),
            timeout=timeout,
            since=since,
            desc=f"message {event!r}" + (f" on channel {channel!r}" if channel else ""),
        )

    def wait_error(self, code: int | None = None, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for a connection ``error`` event (optionally with this Pusher ``code``)."""
        return self.wait_for(
            lambda e: e.get("type") == "error" and (code is None or e.get("code") == code),
            timeout=timeout,
            since=since,
            desc=f"connection error (code={code})",
        )

    def wait_closed(self, code: int | None = None, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for the WebSocket to close (``type: "closed"``), optionally with this close ``code``."""
        return self.wait_for(
            lambda e: e.get("type") == "closed" and (code is None or e.get("code") == code),
            timeout=timeout,
            since=since,
            desc=f"socket close (code={code})",
        )

    def wait_signed_in(self, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for ``pusher:signin_success`` AND for pusher-js's follow-up subscription to
        ``#server-to-user-<id>`` to succeed (only then will ``send_to_user`` events arrive).
        Returns the ``signin_success`` event; fails fast on ``signin_error``."""
        ev = self.wait_for(
            lambda e: e.get("type") in ("signin_success", "signin_error"),
            timeout=timeout,
            since=since,
            desc="signin result",
        )
        if ev["type"] == "signin_error":
            raise AssertionError(f"signin failed: {json.dumps(ev, default=str)}")
        user = json.loads(ev["data"]["user_data"])
        channel = f"#server-to-user-{user['id']}"
        self.wait_for(
            lambda e: e.get("type") == "message"
            and e.get("event") == "pusher_internal:subscription_succeeded"
            and e.get("channel") == channel,
            timeout=timeout,
            since=ev["_seq"],
            desc=f"subscription_succeeded on {channel!r}",
        )
        return ev

    def wait_subscribed(self, channel: str, timeout: float = 10.0, *, since: int = 0) -> dict:
        """Wait for ``pusher:subscription_succeeded`` on ``channel``; fails fast on ``pusher:subscription_error``."""
        ev = self.wait_for(
            lambda e: e.get("type") == "event"
            and e.get("channel") == channel
            and e.get("event") in ("pusher:subscription_succeeded", "pusher:subscription_error"),
            timeout=timeout,
            since=since,
            desc=f"subscription result on {channel!r}",
        )
        if ev["event"] == "pusher:subscription_error":
            raise AssertionError(f"subscription to {channel!r} failed: {json.dumps(ev, default=str)}")
        return ev
