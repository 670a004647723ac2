"""Child processes of the tests: started, watched, and always stopped and reaped."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that take a number, not a
    socket; the race with other programs is unavoidable and harmless in practice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refused_url() -> str:
    """A loopback URL nothing listens on: connecting to it is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> None:
    """Poll `condition` until it holds, or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a whole process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces, so split after its closing parenthesis;
    # utime and stime are fields 14 and 15, i.e. 12th and 13th after it.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    # Runs in the child before exec: should the test run itself be killed, the kernel kills
    # the child, so no server is left eating a core after a crashed run.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class Process:
    """A child process with its stdout and stderr as one stream of lines.

    Without `log_path` the lines are read through a pipe as they come (`wait_for_line`
    awaits one, `lines` has them); with it they go straight to that file, which costs the
    test process nothing however much a busy server writes, and `wait_for_line` polls it.
    `new_session` puts the child and whatever it starts in a session of its own, which
    `stop` ends as a whole. `stop` always reaps: SIGTERM, then SIGKILL after STOP_TIMEOUT.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.argv = argv
        self.name = name or Path(argv[0]).name
        self.log_path = log_path
        self.new_session = new_session
        self._lines: list[str] = []
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._eof = threading.Event()
        output = log_path.open("wb") if log_path is not None else subprocess.PIPE
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                preexec_fn=_die_with_parent,
                start_new_session=new_session,
            )
        finally:
            if log_path is not None:
                output.close()  # type: ignore[union-attr]
        if log_path is None:
            threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._pending.put(raw.decode(errors="replace").rstrip("\n"))
        self._pending.put(None)

    def _collect(self, timeout: float) -> bool:
        """Move the lines read so far into `lines`, waiting up to `timeout` for one; False at
        the end of the output."""
        if self.log_path is not None:
            exited = self.process.poll() is not None
            self._lines = self.log_path.read_text(errors="replace").splitlines()
            if exited:
                return False
            time.sleep(min(timeout, 0.005))
            return True
        if self._eof.is_set():
            return False
        try:
            line = self._pending.get(timeout=timeout)
        except queue.Empty:
            return True
        while line is not None:
            self._lines.append(line)
            try:
                line = self._pending.get_nowait()
            except queue.Empty:
                return True
        self._eof.set()
        return False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def lines(self) -> list[str]:
        """Every line of output so far."""
        self._collect(0)
        return self._lines

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def log_tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line (of all so far and to come) matching `pattern`."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self._lines[checked:]:
                if match := re.search(pattern, line):
                    return match
            checked = len(self._lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.name}: no line matching {pattern!r} within {timeout} s:\n"
                    + self.log_tail()
                )
            if not self._collect(min(left, 0.1)) and checked == len(self._lines):
                status = self.process.wait(STOP_TIMEOUT)
                raise AssertionError(
                    f"{self.name} exited ({status}) before {pattern!r}:\n{self.log_tail()}"
                )

    def check_running(self) -> None:
        """Raise, with the end of its output, if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}; "
                f"its output ends with:\n{self.log_tail()}"
            )

    def exit_status(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit by itself; its status, once its output is read."""
        status = self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while self._collect(max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break  # a child it left behind holds the output open
        return status

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)

    def stop(self) -> int:
        """Stop the process (and its session) if it still runs; reap it; its exit status."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT)
        elif self.new_session:
            # Whatever the leader left behind in its session.
            self.signal(signal.SIGKILL)
        return self.process.returncode
