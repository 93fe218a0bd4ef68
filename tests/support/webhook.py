"""A local HTTP endpoint that records the JSON bodies POSTed to it (grace-mark notices)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


class WebhookReceiver:
    """Serves on a free loopback port until :meth:`stop`; answers every POST with ``status``."""

    def __init__(self, path: str = "/hook", status: int = 204) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []  # {"type": Content-Type, "body": JSON}
        self.bodies: list[Any] = []  # the JSON bodies alone, in arrival order
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.append({"type": self.headers["Content-Type"], "body": body})
                receiver.bodies.append(body)
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}{path}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
