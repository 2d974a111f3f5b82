"""Push notifications: device registry, channel/client/device recipients, asynchronous
publish with a status record, dispatch to APNs, FCM and Web Push by RQ workers.

Modules: ``settings`` (config), ``model`` (validation, rendering), ``status`` (state machine),
``retry`` (backoff), ``crypto`` (JWT, credential envelope, RFC 8291) — all pure; ``providers``
(wire protocols), ``store`` / ``redis_store``, ``queue``, ``dispatcher`` (worker logic),
``service`` (API logic and composition), ``metrics``. See docs/push.md.
"""
