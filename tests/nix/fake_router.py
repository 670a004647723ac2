"""A stand-in for llmhop under systemd, to prove the module's units in a real systemd.

It speaks the contract the units expect of the router: listeners passed by socket activation
(LISTEN_FDS), READY=1 on $NOTIFY_SOCKET, `--config PATH` (read, so it must exist), SIGHUP
reloads the config. GET /health reports what the sandbox let it see and do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

SD_LISTEN_FDS_START = 3


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


def bind_attempt() -> str:
    """Try to open a listener of our own; SocketBindDeny=any must refuse it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
    except PermissionError:
        return "denied"
    return "allowed"


class State:
    config_path = ""
    config: Any = None
    reloads = 0


def load() -> None:
    with open(State.config_path) as handle:
        State.config = json.load(handle)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/health":
            self.send_error(404)
            return
        body = json.dumps(
            {
                "status": "ok",
                "uid": os.getuid(),
                "config": State.config,
                "reloads": State.reloads,
                "bind": bind_attempt(),
                "listen_pid_ok": os.environ.get("LISTEN_PID") == str(os.getpid()),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        print("fake-router:", format % args, flush=True)


def on_hup(_signum: int, _frame: object) -> None:
    load()
    State.reloads += 1
    print(f"fake-router: reloaded ({State.reloads})", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] not in (["--config"], ["-config"]) or len(argv) != 2:
        print("usage: llmhop --config PATH", file=sys.stderr)
        return 2
    State.config_path = argv[1]
    load()
    count = int(os.environ.get("LISTEN_FDS", "0"))
    if count < 1 or os.environ.get("LISTEN_PID") != str(os.getpid()):
        print("fake-router: no socket passed by systemd", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, on_hup)
    server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=SD_LISTEN_FDS_START)
    notify("READY=1\nSTATUS=serving")
    print("fake-router: ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
