"""``/apps/{app_id}/push/...``: the push API, Pusher-signed like every ``/apps`` route.

Only the ``push-admin`` capability is supported: a request without ``x-sockudo-push-capability``
is admin; any other capability is refused with 403. A key of another app gets 403.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue

from sockudo.core.errors import ApiError
from sockudo.http_api.signing import json_body, require_signed_app, services

if TYPE_CHECKING:
    from sockudo.push.service import PushService

bp = Blueprint("push", __name__, url_prefix="/apps/<app_id>/push")


def _push(app_id: str) -> PushService:
    app = require_signed_app(None)
    if app.id != app_id:
        raise ApiError(403, "forbidden", "the signing key belongs to another app")
    capability = request.headers.get("x-sockudo-push-capability", "push-admin")
    if capability != "push-admin":
        raise ApiError(403, "forbidden", f"capability {capability!r} is not allowed here (push-admin only)")
    push = services().push
    if push is None:
        raise ApiError(503, "service_unavailable", "push notifications are disabled ([push] enabled = false)")
    return push


def _tap(app_id: str, accepted: dict[str, Any]) -> None:
    """The console's event log shows each accepted publish (its id and status, no payload)."""
    tap = services().tap
    if tap.attached:
        tap.record(app_id, "push", publish_id=accepted.get("publishId"), status=accepted.get("status"),
                   expected_recipients=accepted.get("expectedRecipients"), fanout=accepted.get("fanoutRegime"),
                   duplicate=accepted.get("duplicate"))


def _json(data: Any, status: int = 200) -> Response:
    resp = jsonify(data)
    resp.status_code = status
    return resp


@bp.post("/deviceRegistrations")
def register_device(app_id: str) -> ResponseReturnValue:
    push = _push(app_id)
    return _json(push.register_device(app_id, json_body()), 201)


@bp.get("/deviceRegistrations")
def list_devices(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).list_devices(app_id, request.args))


@bp.delete("/deviceRegistrations")
def delete_client_devices(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).delete_client_devices(app_id, request.args.get("clientId")))


@bp.get("/deviceRegistrations/<device_id>")
def get_device(app_id: str, device_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).get_device(app_id, device_id))


@bp.delete("/deviceRegistrations/<device_id>")
def delete_device(app_id: str, device_id: str) -> ResponseReturnValue:
    _push(app_id).delete_device(app_id, device_id)
    return Response(status=204)


@bp.post("/channelSubscriptions")
def subscribe(app_id: str) -> ResponseReturnValue:
    push = _push(app_id)
    return _json(push.subscribe(app_id, json_body()), 201)


@bp.get("/channelSubscriptions")
def list_subscriptions(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).list_subscriptions(app_id, request.args))


@bp.delete("/channelSubscriptions")
def unsubscribe(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).unsubscribe(app_id, request.args))


@bp.get("/channelSubscriptions/channels")
def list_channels(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).list_channels(app_id, request.args))


@bp.post("/publish")
def publish(app_id: str) -> ResponseReturnValue:
    push = _push(app_id)
    body = json_body()
    accepted = push.publish(app_id, body)
    _tap(app_id, accepted)
    resp = _json(accepted, 202)
    if request.args.get("mode") == "sync" or (isinstance(body, dict) and body.get("sync") is True):
        resp.headers["X-Sockudo-Forced-Async"] = "publish-api-is-async"
    return resp


@bp.post("/batch/publish")
def batch_publish(app_id: str) -> ResponseReturnValue:
    push = _push(app_id)
    accepted = push.batch_publish(app_id, json_body())
    for item in accepted.get("items", ()):
        _tap(app_id, item)
    return _json(accepted, 202)


@bp.get("/publish/<publish_id>/status")
def publish_status(app_id: str, publish_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).status(app_id, publish_id))


@bp.get("/deadLetters")
def list_dead_letters(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).list_dead_letters(app_id, request.args))


@bp.post("/deadLetters/<letter_id>/replay")
def replay_dead_letter(app_id: str, letter_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).replay_dead_letter(app_id, letter_id), 202)


@bp.post("/credentials/<provider>")
def put_credentials(app_id: str, provider: str) -> ResponseReturnValue:
    push = _push(app_id)
    return _json(push.put_credentials(app_id, provider, json_body()), 201)


@bp.get("/credentials")
def list_credentials(app_id: str) -> ResponseReturnValue:
    return _json(_push(app_id).list_credentials(app_id))
