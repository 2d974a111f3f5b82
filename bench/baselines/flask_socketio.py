"""What a Python team would use instead: Flask-SocketIO under gevent (gevent-websocket).

    python -m bench.baselines.flask_socketio --port 7002

Clients speak Socket.IO 5 over an Engine.IO 4 WebSocket. A ``subscribe`` event joins the
room named by its argument and is acknowledged; ``unsubscribe`` leaves it. ``POST /publish``
with ``{"channel": ..., "data": ...}`` emits one ``bench`` event to that room — python-socketio
encodes the packet once and queues it on each socket's own writer greenlet.

Run the way Flask-SocketIO's own ``socketio.run`` runs it under gevent (a gevent
``WSGIServer`` with gevent-websocket's handler, no access log), on a listener with the same
backlog as Sockudo's.
"""

import os
import sys

# Run as a script, this file's folder comes first on sys.path and its own name would shadow
# the flask_socketio package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from gevent import monkey  # noqa: E402

monkey.patch_all()

import json  # noqa: E402

from flask import Flask, request  # noqa: E402
from flask_socketio import SocketIO, join_room, leave_room  # noqa: E402

from bench.baselines.common import arguments, serve  # noqa: E402

app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent", logger=False, engineio_logger=False, cors_allowed_origins="*")


@socketio.on("subscribe")
def on_subscribe(channel):
    join_room(channel)
    return {"ok": True}


@socketio.on("unsubscribe")
def on_unsubscribe(channel):
    leave_room(channel)


@app.post("/publish")
def publish():
    msg = json.loads(request.get_data())
    socketio.emit(msg.get("name", "bench"), msg["data"], to=msg["channel"])
    return {"ok": True}


@app.get("/live")
def live():
    return "OK"


def main() -> None:
    serve(app, arguments())


if __name__ == "__main__":
    main()
