"""Suite-wide rule: a test run leaves no process of its own behind.

pytest becomes a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER), so whatever a test starts,
including grandchildren whose parent died first, stays pytest's descendant instead of moving
to init. At the end of the session every process still below pytest is listed, killed, and
fails the run. Each suite stops its own processes; this is the check that they did.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
_SUBREAPER = pytest.StashKey[bool]()  # whether this run could become one


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children(parent: int) -> dict[int, tuple[str, str]]:
    """The living processes whose parent is ``parent``: pid -> (state, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name may hold spaces and parentheses: fields start after the last ")".
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            if int(ppid) != parent:
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(entry.name)] = (state, command.strip())
    return found


def _descendants(root: int) -> dict[int, str]:
    """Every living process below ``root``, reaping the ones that are already dead."""
    alive: dict[int, str] = {}
    pending = [root]
    while pending:
        for pid, (state, command) in _children(pending.pop()).items():
            if state == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                continue
            alive[pid] = command
            pending.append(pid)
    return alive


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUBREAPER] = _become_subreaper()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.stash.get(_SUBREAPER, False):
        return
    left = _descendants(os.getpid())
    if not left:
        return
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lines = "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"processes the tests started were still running at the end (now killed):\n{lines}"
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(message)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
