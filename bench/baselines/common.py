"""What both baselines share (imported after their gevent monkey-patching)."""

import argparse
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


def arguments(*extra: tuple[str, dict]) -> argparse.Namespace:
    """``--host``, ``--port``, ``--tcp-nodelay`` and any baseline-specific flags."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="set TCP_NODELAY on accepted sockets, as Sockudo does (the REST scenario)")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    return parser.parse_args()


def serve(app, args) -> None:
    """Serve ``app`` on a listener with Sockudo's settings (backlog 2048), so connect rates
    compare fairly; gevent-websocket's handler, with TCP_NODELAY when asked."""
    from gevent.pywsgi import WSGIServer

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    sock.setblocking(False)
    handler = NoDelayHandler if args.tcp_nodelay else WebSocketHandler
    WSGIServer(sock, app, handler_class=handler, log=None).serve_forever()
