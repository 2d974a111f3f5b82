"""What both baselines share (imported after their gevent monkey-patching)."""

import socket

from geventwebsocket.handler import WebSocketHandler


class NoDelayHandler(WebSocketHandler):
    """``--tcp-nodelay``: pywsgi writes a response's headers and body in two sends; without
    TCP_NODELAY, Nagle holds the body until the client ACKs the headers, which Linux delays
    ~40 ms on a warm keep-alive connection. Sockudo sets it on every accepted socket; the REST
    scenario's Node client cannot set TCP_QUICKACK to dodge the stall, so there the baselines
    get the same socket option."""

    def handle(self):
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().handle()
