"""The router as users run it: `python3 llmhop.py --config FILE`, one process."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from tests.support import ROUTER_SCRIPT
from tests.support.processes import Process

START_TIMEOUT = 10.0
LISTENING = re.compile(r"listening on (\S+):(\d+) ")


class RouterProcess:
    """The router on the config `config` (written to `work_dir`; on 127.0.0.1 and an ephemeral
    port unless it says otherwise), ready once it printed its `listening on` line.

    Its stderr is read as it comes (a full pipe would block its log writes) into `lines`;
    `env` is its whole environment besides PATH; `prefix` goes before the command (`taskset`);
    `script` is the router to run. `stop` ends it and returns what it wrote.
    """

    def __init__(
        self,
        config: dict[str, Any],
        work_dir: Path,
        env: dict[str, str] | None = None,
        *,
        script: Path = ROUTER_SCRIPT,
        prefix: list[str] | None = None,
        name: str = "llmhop",
        log_path: Path | None = None,
    ) -> None:
        path = work_dir / "config.json"
        path.write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}, indent=2))
        self.managed = Process(
            [*(prefix or []), sys.executable, str(script), "--config", str(path)],
            name=name,
            env={"PATH": os.environ["PATH"], **(env or {})},
            log_path=log_path,
        )
        self.process = self.managed.process
        try:
            match = self.managed.wait_for_line(LISTENING, START_TIMEOUT)
        except (TimeoutError, AssertionError):
            self.managed.stop()
            raise
        self.first_line = match.string
        self.host = match[1]
        self.address = (match[1], int(match[2]))

    @property
    def pid(self) -> int:
        return self.managed.pid

    @property
    def lines(self) -> list[str]:
        return self.managed.lines

    @property
    def base_url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        return self.managed.wait_for_line(pattern, timeout)

    def stop(self) -> str:
        """Terminate, wait, and return everything the router wrote."""
        self.managed.stop()
        self.managed.exit_status()
        return "".join(line + "\n" for line in self.managed.lines)
