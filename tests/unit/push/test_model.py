"""Push request validation and payload rendering."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sockudo.core.errors import ApiError
from sockudo.push import model
from sockudo.push.crypto import b64url

NOW = 1_700_000_000_000
P256 = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"


def publish(**body: Any) -> model.PublishRequest:
    body.setdefault("recipients", [{"type": "channel", "channel": "orders"}])
    body.setdefault("payload", {"title": "Order updated", "body": "Packed"})
    return model.parse_publish(body, now_ms=NOW)


def test_publish_accepts_both_casings_and_ignores_sync() -> None:
    a = publish(publishId="p-1", sync=False)
    b = publish(publish_id="p-1", sync=True)
    assert a.publish_id == b.publish_id == "p-1" and a.caller_publish_id
    assert a.intent_hash == b.intent_hash  # sync and the spelling of the id are not part of the intent
    assert publish().publish_id.startswith("pub_") and not publish().caller_publish_id
    with pytest.raises(ApiError, match="disagree"):
        publish(publishId="a", publish_id="b")
    snake = publish(recipients=[{"type": "device", "device_id": "d"}, {"type": "client", "clientId": "u"}])
    assert snake.recipients == (("device", "d"), ("client", "u"))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"recipients": [{"type": "topic"}]}, "unknown recipient type 'topic'"),
        ({"recipients": [{"type": "providerTopic", "provider": "fcm", "topic": "x"}]}, "not supported"),
        ({"recipients": [{"type": "device"}]}, "device_id"),
        ({"recipients": [{"type": "channel", "channel": "bad channel"}]}, "channel"),
        ({"payload": {"title": "t", "data2": 1}}, "not a payload field"),
        ({"payload": {"templateId": "welcome"}}, "templates are not supported"),
        ({"payload": {"icon": "http://insecure/icon.png", "title": "t"}}, "https URL"),
        ({"payload": {}}, "needs a title"),
        ({"notBeforeMs": NOW + 10, "expiresAtMs": NOW + 5}, "before expiresAtMs"),
        ({"bogus": 1}, "not a publish field"),
        ({"providerOverrides": [{"provider": "hms", "payload": {}}]}, "unsupported provider"),
        (
            {"providerOverrides": [{"provider": "apns", "payload": {"headers": {"apns-push-type": "nope"}}}]},
            "apns-push-type",
        ),
        ({"providerOverrides": [{"provider": "webpush", "payload": {"headers": {"x-evil": "1"}}}]}, "not allowed"),
    ],
)
def test_publish_validation(body: dict[str, Any], words: str) -> None:
    with pytest.raises(ApiError) as err:
        publish(**body)
    assert err.value.status == 400 and words in err.value.message


def test_rendering_per_provider() -> None:
    request = publish(
        payload={
            "title": "T",
            "body": "B",
            "sound": "ding",
            "collapseKey": "orders",
            "icon": "https://cdn.example.com/i.png",
            "templateData": {"id": 7, "s": "x"},
        },
        expiresAtMs=NOW + 60_000,
    )
    apns, fcm, web = request.rendered["apns"], request.rendered["fcm"], request.rendered["webpush"]
    assert apns["body"] == {"aps": {"alert": {"title": "T", "body": "B"}, "sound": "ding"}, "data": {"id": 7, "s": "x"}}
    assert apns["headers"] == {
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-collapse-id": "orders",
        "apns-expiration": str((NOW + 60_000) // 1000),
    }
    assert fcm["message"] == {
        "notification": {"title": "T", "body": "B", "image": "https://cdn.example.com/i.png"},
        "data": {"id": "7", "s": "x"},
        "android": {"collapse_key": "orders", "notification": {"sound": "ding"}},
    }
    assert web["body"]["notification"]["icon"] == "https://cdn.example.com/i.png"
    assert web["headers"] == {"urgency": "normal", "topic": "orders"}
    silent = publish(payload={"templateData": {"k": "v"}}).rendered["apns"]["headers"]
    assert silent["apns-push-type"] == "background" and silent["apns-priority"] == "5"


def test_overrides_replace_a_provider_mapping_and_limits_are_per_provider() -> None:
    request = publish(
        providerOverrides=[
            {
                "provider": "apns",
                "payload": {
                    "aps": {"content-available": 1},
                    "headers": {"apns-push-type": "background", "apns-priority": "5"},
                },
            }
        ]
    )
    assert request.rendered["apns"]["body"] == {"aps": {"content-available": 1}}
    assert request.used_override == {"apns": True, "fcm": False, "webpush": False}
    with pytest.raises(ApiError, match="fcm payload exceeds 4096 bytes"):
        publish(payload={"title": "x", "body": "b" * 3000, "icon": "https://c.example/" + "i" * 1500})


def test_device_registration_validation() -> None:
    web = model.parse_device(
        "app",
        {
            "id": "w",
            "platform": "browser",
            "push": {
                "recipient": {
                    "transportType": "web",
                    "endpoint": "https://push.example.net/s/1",
                    "p256dh": P256,
                    "auth": AUTH,
                }
            },
        },
        now_ms=NOW,
        allow_insecure=False,
    )
    assert web["provider"] == "webpush" and len(web["tokenHash"]) == 64
    view = model.device_view(web)
    assert "endpoint" not in json.dumps(view) and view["recipient"]["provider"] == "webpush"
    for recipient, words in (
        ({"transportType": "web", "endpoint": "http://push.example.net/s", "p256dh": P256, "auth": AUTH}, "https"),
        ({"transportType": "web", "endpoint": "https://10.1.2.3/s", "p256dh": P256, "auth": AUTH}, "local"),
        ({"transportType": "web", "endpoint": "https://push.example.net/s", "p256dh": "xx", "auth": AUTH}, "p256dh"),
        (
            {
                "transportType": "web",
                "endpoint": "https://push.example.net/s",
                "p256dh": P256,
                "auth": b64url(b"short"),
            },
            "auth",
        ),
        ({"transportType": "apns", "deviceToken": "zz"}, "deviceToken"),
        ({"transportType": "wns", "channelUri": "https://x"}, "not supported"),
    ):
        with pytest.raises(ApiError, match=words):
            model.parse_device(
                "app",
                {"id": "d", "platform": "ios", "push": {"recipient": recipient}},
                now_ms=NOW,
                allow_insecure=False,
            )
    with pytest.raises(ApiError, match="may not start"):
        model.parse_device(
            "app",
            {
                "id": "__sockudo_client_scope__:x",
                "platform": "ios",
                "push": {"recipient": {"transportType": "apns", "deviceToken": "ab" * 32}},
            },
            now_ms=NOW,
            allow_insecure=False,
        )
