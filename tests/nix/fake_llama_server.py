"""A stand-in for llama.cpp's `llama-server`, to run the module's worker units under systemd.

It takes the flags the module renders: `--host` (a path ending in .sock: a unix socket),
`--alias`, `--api-key-file` (read at start: the unit fails unless systemd expanded `%d` and
loaded the credential) and ignores the rest, as far as they are `--key value` or `--flag`.
Test-only flags:

  --ready-file PATH    GET /health answers 503 (loading) until PATH exists, then 200;
                       without it, the first probe gets 503 and the next ones 200.
  --die-while-loading  exit 3 after the first health probe, as a server whose loading fails.

Any other request needs `Authorization: Bearer <key>` and answers JSON naming the alias.
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

FLAGS = {"--jinja", "--die-while-loading", "--no-mmap", "--mmap"}


def parse(argv: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    index = 0
    while index < len(argv):
        name = argv[index]
        if not name.startswith("--"):
            sys.exit(f"fake llama-server: unexpected argument {name!r}")
        if name in FLAGS:
            options[name[2:]] = "true"
            index += 1
            continue
        if index + 1 == len(argv):
            sys.exit(f"fake llama-server: {name} needs a value")
        options[name[2:]] = argv[index + 1]
        index += 2
    return options


class Server(socketserver.UnixStreamServer):
    alias = ""
    api_key = ""
    ready_file: Path | None = None
    die_while_loading = False
    probes = 0


class Handler(BaseHTTPRequestHandler):
    server: Server

    def address_string(self) -> str:  # a unix peer has no address
        return "unix"

    def reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/health":
            self.do_POST()
            return
        server = self.server
        server.probes += 1
        print(f"health probe {server.probes}", file=sys.stderr, flush=True)
        if server.die_while_loading:
            self.reply(503, {"error": {"message": "Loading model"}})
            print("failed to load the model", file=sys.stderr, flush=True)
            os._exit(3)
        loaded = server.ready_file.exists() if server.ready_file else server.probes > 1
        if loaded:
            self.reply(200, {"status": "ok"})
        else:
            self.reply(503, {"error": {"message": "Loading model"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self.reply(401, {"error": {"message": "Invalid API Key"}})
            return
        self.reply(
            200,
            {"model": self.server.alias, "path": self.path, "received": len(body), "via": "socket"},
        )


def main() -> None:
    options = parse(sys.argv[1:])
    host = options.get("host", "")
    if not host.endswith(".sock"):
        sys.exit(f"fake llama-server: --host {host!r} is not a unix socket")
    key_file = options.get("api-key-file")
    if key_file is None:
        sys.exit("fake llama-server: --api-key-file is required")
    api_key = Path(key_file).read_text().strip()  # fails unless %d/… was loaded
    # Binding fails with EADDRINUSE when a stale socket file is left over.
    server = Server(host, Handler)
    server.alias = options.get("alias", "")
    server.api_key = api_key
    server.die_while_loading = "die-while-loading" in options
    if "ready-file" in options:
        server.ready_file = Path(options["ready-file"])
    mode = oct(os.stat(host).st_mode & 0o777)
    print(f"listening on {host} (mode {mode}) as {server.alias}", file=sys.stderr, flush=True)
    # As llama-server: the first SIGINT (the unit's KillSignal) or SIGTERM stops it cleanly
    # (status 0, after a moment of cleanup); a second one while stopping exits 1 at once.
    stopping = threading.Event()

    def stop(*_: object) -> None:
        if stopping.is_set():
            print("Received second interrupt, terminating immediately.", file=sys.stderr)
            os._exit(1)
        stopping.set()
        threading.Timer(0.5, os._exit, (0,)).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
