"""A stand-in model server for the llmhop-notify tests: 503 while "loading", then 200.

fake_worker.py (--port N | --unix PATH) [--loading N] [--health-status S]
               [--exit-after-ready CODE] [--probes FILE]
"""

from __future__ import annotations

import argparse
import http.server
import os
import socketserver
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    options: argparse.Namespace
    answered = 0

    def do_GET(self) -> None:
        options = self.options
        loading = Handler.answered < options.loading
        Handler.answered += 1
        status = 503 if loading else options.health_status
        if options.probes:
            with open(options.probes, "a") as probes:
                probes.write(f"{self.path} {status}\n")
        body = b"loading" if loading else b"ok"
        self.send_response(status)
        if status in (301, 302):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if status == 200 and options.exit_after_ready is not None:
            self.wfile.flush()
            os._exit(options.exit_after_ready)

    def log_message(self, format: str, *args: object) -> None:
        pass


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--unix")
    parser.add_argument("--loading", type=int, default=0)
    parser.add_argument("--health-status", type=int, default=200)
    parser.add_argument("--exit-after-ready", type=int)
    parser.add_argument("--probes")
    Handler.options = parser.parse_args()
    options = Handler.options
    if options.unix:
        server: socketserver.BaseServer = UnixServer(options.unix, Handler)
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("fake worker serving", file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
