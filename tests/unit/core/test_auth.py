"""HMAC signing: channel auth, user sign-in, REST request verification."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import urlencode

import pytest
from pusher import Pusher
from pusher.pusher_client import PusherClient

from sockudo.core import auth
from sockudo.core.errors import ApiError

KEY, SECRET, SOCKET = "app-key", "app-secret", "1234.5678"

# Golden vectors (clients-and-field-lessons.md, wire quirk 7): produced by the node and
# python Pusher SDKs.
PRIVATE_FOO = "app-key:d7d4254b75e2b60944b91bc92e916d56da84c4835011f5aa3c59a8e7f6e8b65d"
USER_DATA = '{"id":"u1","name":"A"}'
USER_AUTH = "app-key:5ba671aa7bd507bed73ee100ddde26597f227f0a8c084fd2bd69b0ba095bcd19"


def _hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


# -- channel and user auth ------------------------------------------------------


def test_private_channel_golden_vector() -> None:
    assert auth.channel_auth(KEY, SECRET, SOCKET, "private-foo") == PRIVATE_FOO
    assert auth.verify_channel_auth(KEY, SECRET, SOCKET, "private-foo", PRIVATE_FOO)


def test_user_auth_golden_vector() -> None:
    assert auth.user_auth(KEY, SECRET, SOCKET, USER_DATA) == USER_AUTH
    assert auth.verify_user_auth(KEY, SECRET, SOCKET, USER_DATA, USER_AUTH)


@pytest.mark.parametrize(
    ("socket_id", "channel", "signature"),
    [
        ("1234.5679", "private-foo", PRIVATE_FOO),  # another socket
        (SOCKET, "private-bar", PRIVATE_FOO),  # another channel
        (SOCKET, "private-foo", "other-key:" + PRIVATE_FOO.split(":", 1)[1]),  # foreign key
        (SOCKET, "private-foo", PRIVATE_FOO.upper()),  # hex case matters
        (SOCKET, "private-foo", PRIVATE_FOO.split(":", 1)[1]),  # no key prefix
        (SOCKET, "private-foo", ""),
    ],
)
def test_channel_auth_rejects_anything_but_the_exact_string(socket_id: str, channel: str, signature: str) -> None:
    assert not auth.verify_channel_auth(KEY, SECRET, socket_id, channel, signature)


def test_user_auth_rejects_other_user_data_and_wrong_secret() -> None:
    assert not auth.verify_user_auth(KEY, SECRET, SOCKET, '{"id":"u2","name":"A"}', USER_AUTH)
    assert not auth.verify_user_auth(KEY, "other-secret", SOCKET, USER_DATA, USER_AUTH)


def test_presence_signs_the_raw_channel_data() -> None:
    """The python SDK serialises with ", "/": ", node compactly; both must verify (quirk 6)."""
    member = {"user_id": "u1", "user_info": {"name": "A"}}
    python_style = json.dumps(member)
    compact = json.dumps(member, separators=(",", ":"))
    assert python_style != compact
    sig_py = auth.channel_auth(KEY, SECRET, SOCKET, "presence-x", python_style)
    sig_compact = auth.channel_auth(KEY, SECRET, SOCKET, "presence-x", compact)
    assert sig_py != sig_compact
    assert sig_py == f"{KEY}:{_hex(SECRET, f'{SOCKET}:presence-x:{python_style}')}"
    assert auth.verify_channel_auth(KEY, SECRET, SOCKET, "presence-x", sig_py, python_style)
    assert auth.verify_channel_auth(KEY, SECRET, SOCKET, "presence-x", sig_compact, compact)
    # Never a re-serialisation: each signature only fits its own string.
    assert not auth.verify_channel_auth(KEY, SECRET, SOCKET, "presence-x", sig_py, compact)
    assert not auth.verify_channel_auth(KEY, SECRET, SOCKET, "presence-x", sig_compact, python_style)


def test_presence_auth_from_the_python_sdk_verifies() -> None:
    sdk = Pusher(app_id="1", key=KEY, secret=SECRET)
    out = sdk.authenticate(channel="presence-x", socket_id=SOCKET, custom_data={"user_id": "u1", "user_info": {"n": 1}})
    assert auth.verify_channel_auth(KEY, SECRET, SOCKET, "presence-x", out["auth"], out["channel_data"])


def test_webhook_signature_is_hmac_of_the_raw_body() -> None:
    body = b'{"time_ms":1,"events":[]}'
    assert auth.webhook_signature(SECRET, body) == hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


# -- REST request verification ------------------------------------------------

NOW = 1_353_088_179


def _signed_query(method: str, path: str, params: dict[str, str], secret: str = SECRET) -> str:
    """Sign as Pusher's REST API describes: lower-cased keys, sorted, joined raw."""
    ordered = sorted((k.lower(), v) for k, v in params.items())
    string_to_sign = f"{method}\n{path}\n" + "&".join(f"{k}={v}" for k, v in ordered)
    return urlencode({**params, "auth_signature": _hex(secret, string_to_sign)})


def _params(body: bytes | None = None, **extra: str) -> dict[str, str]:
    params = {"auth_key": KEY, "auth_timestamp": str(NOW), "auth_version": "1.0"}
    if body is not None:
        params["body_md5"] = hashlib.md5(body).hexdigest()
    params.update(extra)
    return params


def _verify(method: str, path: str, query: str, body: bytes = b"", now: float = NOW, secret: str = SECRET) -> None:
    auth.verify_rest_request(secret=secret, method=method, path=path, query_string=query, body=body, now=now)


def _rejected(method: str, path: str, query: str, body: bytes = b"", now: float = NOW) -> ApiError:
    with pytest.raises(ApiError) as info:
        _verify(method, path, query, body, now)
    assert info.value.status == 401
    return info.value


def test_rest_signature_matches_the_pusher_docs_example() -> None:
    """The worked example from Pusher's REST API docs (key 278d…, secret 7ad3…)."""
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    query = (
        "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0"
        "&body_md5=ec365a775a4cd0599faeb73354201b6f"
        "&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    )
    auth.verify_rest_request(
        secret="7ad3773142a6692b25b8", method="POST", path="/apps/3/events", query_string=query, body=body, now=NOW
    )


def test_good_post_signature_is_accepted() -> None:
    body = b'{"name":"e","channels":["a"],"data":"x"}'
    _verify("POST", "/apps/1/events", _signed_query("POST", "/apps/1/events", _params(body)), body)


def test_requests_signed_by_the_python_sdk_are_accepted() -> None:
    client = PusherClient(app_id="1", key=KEY, secret=SECRET)
    requests = [
        client.trigger.make_request(["a", "b"], "ev", {"x": 1}, socket_id="1.2"),
        client.trigger_batch.make_request([{"channel": "a", "name": "e", "data": "d"}]),
        client.channels_info.make_request(prefix_filter="presence-", attributes=["user_count"]),
        client.channel_info.make_request("presence-a", attributes=["user_count", "subscription_count"]),
        client.users_info.make_request("presence-a"),
        client.terminate_user_connections.make_request("u1"),
    ]
    for req in requests:
        body = req.body if isinstance(req.body, bytes) else (req.body or "").encode()
        auth.verify_rest_request(
            secret=SECRET, method=req.method, path=req.path, query_string=req.query_string, body=body, now=time.time()
        )


def test_forged_signature_is_rejected() -> None:
    body = b"{}"
    query = _signed_query("POST", "/apps/1/events", _params(body), secret="not-the-secret")
    err = _rejected("POST", "/apps/1/events", query, body)
    assert "signature" in err.message.lower()


def test_signature_covers_method_and_path() -> None:
    query = _signed_query("GET", "/apps/1/channels", _params())
    _verify("GET", "/apps/1/channels", query)
    _rejected("GET", "/apps/2/channels", query)
    _rejected("DELETE", "/apps/1/channels", query)


def test_missing_signature_is_rejected() -> None:
    _rejected("GET", "/apps/1/channels", urlencode(_params()))


@pytest.mark.parametrize("skew", [601, -601, 10_000])
def test_stale_or_future_timestamp_is_rejected(skew: int) -> None:
    query = _signed_query("GET", "/apps/1/channels", _params())
    err = _rejected("GET", "/apps/1/channels", query, now=NOW + skew)
    assert "timestamp" in err.message.lower()


def test_timestamp_within_the_window_is_accepted() -> None:
    query = _signed_query("GET", "/apps/1/channels", _params())
    _verify("GET", "/apps/1/channels", query, now=NOW + 599)
    _verify("GET", "/apps/1/channels", query, now=NOW - 599)


@pytest.mark.parametrize("timestamp", [None, "", "yesterday", "1353088179.5"])
def test_missing_or_non_integer_timestamp_is_rejected(timestamp: str | None) -> None:
    params = _params()
    if timestamp is None:
        del params["auth_timestamp"]
    else:
        params["auth_timestamp"] = timestamp
    _rejected("GET", "/apps/1/channels", _signed_query("GET", "/apps/1/channels", params))


def test_post_without_body_md5_is_rejected_even_when_signed() -> None:
    body = b'{"name":"e","channel":"a"}'
    query = _signed_query("POST", "/apps/1/events", _params())
    err = _rejected("POST", "/apps/1/events", query, body)
    assert "body_md5" in err.message


def test_post_with_wrong_body_md5_is_rejected_even_when_signed() -> None:
    body = b'{"name":"e","channel":"a"}'
    query = _signed_query("POST", "/apps/1/events", _params(b'{"name":"other"}'))
    _rejected("POST", "/apps/1/events", query, body)


def test_empty_post_needs_the_md5_of_the_empty_body() -> None:
    path = "/apps/1/users/u1/terminate_connections"
    _verify("POST", path, _signed_query("POST", path, _params(b"")), b"")
    _rejected("POST", path, _signed_query("POST", path, _params()), b"")


def test_get_accepts_body_md5_of_the_empty_body() -> None:
    """The python SDK sends body_md5 of b"" on every GET (quirk 5)."""
    query = _signed_query("GET", "/apps/1/channels", _params(b""))
    _verify("GET", "/apps/1/channels", query)


def test_get_rejects_any_other_body_md5() -> None:
    query = _signed_query("GET", "/apps/1/channels", _params(b"something"))
    _rejected("GET", "/apps/1/channels", query)


def test_extra_query_params_count_in_the_signature() -> None:
    path = "/apps/1/channels"
    signed = _signed_query("GET", path, _params(filter_by_prefix="presence-", info="user_count"))
    _verify("GET", path, signed)
    # Adding a parameter the signer did not sign breaks the signature.
    _rejected("GET", path, signed + "&info=subscription_count")
    unsigned_extra = _signed_query("GET", path, _params()) + "&filter_by_prefix=private-"
    _rejected("GET", path, unsigned_extra)


def test_keys_are_lower_cased_and_sorted_before_signing() -> None:
    path = "/apps/1/channels"
    params = {
        "Info": "user_count",
        "AUTH_TIMESTAMP": str(NOW),
        "auth_version": "1.0",
        "Auth_Key": KEY,
        "filter_by_prefix": "presence-",
    }
    expected_string = (
        f"GET\n{path}\nauth_key={KEY}&auth_timestamp={NOW}&auth_version=1.0&filter_by_prefix=presence-&info=user_count"
    )
    signature = _hex(SECRET, expected_string)
    # Sent in a scrambled order with mixed-case keys, and with a mixed-case signature key.
    query = urlencode(list(params.items()) + [("Auth_Signature", signature)])
    _verify("GET", path, query)
    assert auth.rest_string_to_sign("get", path, auth.query_pairs(query)) == expected_string


def test_values_are_url_decoded_but_not_re_encoded() -> None:
    """A value like ``presence-a,b`` is signed as it reads, not percent-encoded."""
    path = "/apps/1/channels"
    params = _params(filter_by_prefix="presence-", info="user_count,subscription_count")
    query = _signed_query("GET", path, params)
    assert "user_count%2Csubscription_count" in query
    _verify("GET", path, query)
