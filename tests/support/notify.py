"""The systemd side of sd_notify: a datagram socket that collects what a service sends."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

WAIT = 10.0


class NotifyReceiver:
    """NOTIFY_SOCKET for a process under test: `path` to hand it, `messages` as received."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def next(self, timeout: float = WAIT) -> str:
        """The next message; TimeoutError when none comes within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            raise TimeoutError(f"no sd_notify message within {timeout} s") from None
        self.messages.append(message)
        return message

    def until(self, predicate: Callable[[str], bool], timeout: float = WAIT) -> str:
        """The first message that satisfies `predicate`, skipping others."""
        deadline = time.monotonic() + timeout
        while not predicate(message := self.next(max(0.0, deadline - time.monotonic()))):
            pass
        return message

    def pending(self) -> str | None:
        """A message already sent, or None; never waits."""
        self.sock.setblocking(False)
        try:
            message = self.sock.recv(4096).decode()
        except BlockingIOError:
            return None
        self.messages.append(message)
        return message

    def close(self) -> None:
        self.sock.close()
