"""A stand-in for the Hugging Face hub, serving what huggingface_hub's downloads ask of it.

    fake_hub.py PORT ROOT

ROOT/repos.json describes the repositories: {"org/name": {"commit": "<40 hex>", "branches":
{"main": "<40 hex>"}, "token": "<token of a gated repository>", "cut": {"file": NAME,
"after": BYTES}, "revisions": {"<40 hex>": FOLDER}}}; a repository's files are
ROOT/org/name/<path> at `commit`, ROOT/FOLDER/<path> at each other commit of `revisions`.
Served, as the hub does:

    GET  /api/models/{repo}/revision/{revision}   repository info with `sha` and `siblings`
    GET  /api/models/{repo}/tree/{revision}       every file, with its LFS sha256 and size
    HEAD /{repo}/resolve/{revision}/{path}        X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{revision}/{path}        the file; `Range: bytes=N-` gives 206

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). With `cut`, the first whole GET of that file stops after `after` bytes. Every
request is appended to ROOT/requests.log as `METHOD PATH RANGE`. Tells systemd READY=1 once
it listens (Type=notify). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

ROUTE = re.compile(
    r"/(?:api/models/(?P<api_repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<api_rev>[^/]+)"
    r"|(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+))"
)


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Hub(BaseHTTPRequestHandler):
    root: Path
    # Shared by the handlers of every request.
    cut_done: ClassVar[set[str]] = set()
    lock = threading.Lock()

    def log_message(self, format: str, *args: object) -> None:
        print(format % args, file=sys.stderr, flush=True)

    def do_HEAD(self) -> None:
        self.serve(body=False)

    def do_GET(self) -> None:
        self.serve(body=True)

    def serve(self, body: bool) -> None:
        request_range = self.headers.get("Range", "-")
        with self.lock, (self.root / "requests.log").open("a") as log:
            log.write(f"{self.command} {urlsplit(self.path).path} {request_range}\n")
        match = ROUTE.fullmatch(unquote(urlsplit(self.path).path))
        try:
            if match is None:
                raise Refusal(404, "RepoNotFound", "Repository not found")
            repo = match["api_repo"] or match["repo"]
            info, commit = self.resolve(repo, match["api_rev"] or match["rev"])
            files = self.files(info.get("revisions", {}).get(commit, repo))
            if match["kind"] == "revision":
                siblings = [{"rfilename": path} for path in files]
                self.json({"id": repo, "modelId": repo, "sha": commit, "siblings": siblings})
            elif match["kind"] == "tree":
                self.json([self.entry(path, data) for path, data in files.items()])
            else:
                self.file(repo, info, commit, match["path"], files, body)
        except Refusal as refusal:
            self.send_response(refusal.status)
            self.send_header("X-Error-Code", refusal.code)
            self.send_header("X-Error-Message", str(refusal))
            self.send_header("Content-Length", "0")
            self.end_headers()

    def resolve(self, repo: str, revision: str) -> tuple[dict, str]:
        repos = json.loads((self.root / "repos.json").read_text())
        if repo not in repos:
            raise Refusal(401, "RepoNotFound", "Repository not found")
        info = repos[repo]
        token = info.get("token")
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            raise Refusal(401, "GatedRepo", f"Access to model {repo} is restricted.")
        commit = info["branches"].get(revision, revision)
        if commit != info["commit"] and commit not in info.get("revisions", {}):
            raise Refusal(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return info, commit

    def files(self, folder: str) -> dict[str, bytes]:
        base = self.root / folder
        return {
            str(path.relative_to(base)): path.read_bytes()
            for path in sorted(base.rglob("*"))
            if path.is_file()
        }

    @staticmethod
    def entry(path: str, data: bytes) -> dict:
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return {"type": "file", "oid": blob, "size": len(data), "path": path, "lfs": lfs}

    def json(self, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def file(self, repo: str, info: dict, commit: str, path: str, files: dict, body: bool) -> None:
        if path not in files:
            raise Refusal(404, "EntryNotFound", f"{path} does not exist")
        data = files[path]
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
        self.send_response(206 if wanted else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = info.get("cut") or {}
        key = f"{repo}/{path}"
        with self.lock:
            cutting = cut.get("file") == path and not wanted and key not in self.cut_done
            if cutting:
                self.cut_done.add(key)
        if cutting:
            self.wfile.write(data[: cut["after"]])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data[start:])


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.connect("\0" + address[1:] if address.startswith("@") else address)
            notify.send(b"READY=1")


def main() -> None:
    port, root = int(sys.argv[1]), Path(sys.argv[2])
    Hub.root = root
    server = ThreadingHTTPServer(("127.0.0.1", port), Hub)
    notify_ready()
    server.serve_forever()


if __name__ == "__main__":
    main()
