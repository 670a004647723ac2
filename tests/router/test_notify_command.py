"""llmhop-notify: sd_notify readiness for worker processes that cannot send it themselves."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from support import WAIT

from tests.support import FAKE_ENGINE, ROUTER_SCRIPT
from tests.support.notify import NotifyReceiver
from tests.support.processes import Process, free_port


class Notify:
    """llmhop-notify with NOTIFY_SOCKET, in a session of its own so that the worker it
    starts is stopped with it."""

    def __init__(self, tmp_path: Path, args: list[str], *, argv0: list[str] | None = None):
        self.receiver = NotifyReceiver(tmp_path / "notify.sock")
        command = argv0 or [sys.executable, str(ROUTER_SCRIPT), "notify"]
        self.process = Process(
            [*command, *args],
            name="llmhop-notify",
            env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": self.receiver.path},
            new_session=True,
        )

    def message(self) -> str:
        return self.receiver.next(WAIT)

    def pending_message(self) -> str | None:
        return self.receiver.pending()

    def wait(self) -> int:
        return self.process.exit_status(WAIT * 2)

    def output(self) -> str:
        return self.process.output

    def close(self) -> None:
        """Stop llmhop-notify and its worker, whether or not the test got to stop them."""
        self.process.stop()
        self.receiver.close()


@pytest.fixture
def notify(tmp_path: Path):
    started: list[Notify] = []

    def start(args: list[str], **kwargs: list[str]) -> Notify:
        item = Notify(tmp_path, args, **kwargs)
        started.append(item)
        return item

    yield start
    for item in started:
        item.close()


def worker(*listen: str, loading: int = 0, **fake: str) -> list[str]:
    """The fake engine as llama-server listening on `listen` (`--host` …), answering 503 to
    its first `loading` probes and dying of signals as a plain server does; `fake` are
    its other `--fake-*` flags."""
    flags = [f"--fake-{key.replace('_', '-')}={value}" for key, value in fake.items()]
    return [
        sys.executable,
        "-I",
        str(FAKE_ENGINE),
        "llama-server",
        *listen,
        "--alias=worker",
        f"--fake-loading-probes={loading}",
        "--fake-plain-signals",
        *flags,
    ]


def probes(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_ready_only_once_healthy_on_a_unix_socket(notify, tmp_path: Path) -> None:
    sock = str(tmp_path / "http.sock")
    probe_log = tmp_path / "probes"
    run = notify(
        [
            "-url",
            f"unix://{sock}",
            "-health-path",
            "/health",
            "--",
            *worker("--host", sock, loading=2, probe_log=str(probe_log)),
        ]
    )
    ready = run.message()
    name = os.path.basename(sys.executable)
    assert ready == f"READY=1\nSTATUS={name} is healthy at unix://{sock}/health"
    assert probes(probe_log) == ["/health 503", "/health 503", "/health 200"]
    run.process.process.send_signal(signal.SIGTERM)  # forwarded: the worker dies of it
    assert run.wait() == 128 + signal.SIGTERM


def test_tcp_url_with_base_path_and_custom_health_path(notify, tmp_path: Path) -> None:
    port = free_port()
    probe_log = tmp_path / "probes"
    run = notify(
        [
            f"--url=http://127.0.0.1:{port}/base",
            "-health-path",
            "/v1/models",
            *worker(
                "--host=127.0.0.1",
                f"--port={port}",
                health_path="/base/v1/models",
                probe_log=str(probe_log),
            ),
        ]
    )
    assert run.message().startswith("READY=1\n")
    assert probes(probe_log) == ["/base/v1/models 200"]


def test_child_dying_before_ready_fails_at_once(notify) -> None:
    started = time.monotonic()
    run = notify(["-url", "http://127.0.0.1:9", "--", "sh", "-c", "exit 3"])
    assert run.wait() == 3
    assert time.monotonic() - started < WAIT
    assert run.pending_message() is None
    assert "exited before it was ready" in run.output()


def test_exit_code_of_the_child_after_ready(notify, tmp_path: Path) -> None:
    sock = str(tmp_path / "http.sock")
    run = notify(["-url", f"unix://{sock}", *worker("--host", sock, exit_after_ready="7")])
    assert run.message().startswith("READY=1\n")
    assert run.wait() == 7


def test_redirect_is_not_ready(notify, tmp_path: Path) -> None:
    sock = str(tmp_path / "http.sock")
    probe_log = tmp_path / "probes"
    run = notify(
        [
            "-url",
            f"unix://{sock}",
            *worker("--host", sock, health_status="301", probe_log=str(probe_log)),
        ]
    )
    deadline = time.monotonic() + WAIT
    while len(probes(probe_log)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert probes(probe_log)[:2] == ["/health 301", "/health 301"]
    assert run.pending_message() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "-url is required"),
        (["-url", "http://x"], "a command to run is required"),
        (["-url", "ftp://x", "true"], "must be an absolute http(s) or unix URL"),
        (["-bogus", "1", "true"], "unknown flag -bogus"),
        (["-url"], "flag -url needs a value"),
    ],
)
def test_usage_errors(notify, args: list[str], message: str) -> None:
    run = notify(args)
    assert run.wait() == 1
    stderr = run.output()
    assert message in stderr
    assert "usage: llmhop-notify -url" in stderr


def test_installed_name_runs_notify(notify, tmp_path: Path) -> None:
    link = tmp_path / "llmhop-notify"
    link.symlink_to(ROUTER_SCRIPT)
    run = notify(
        ["-url", "http://127.0.0.1:9", "--", "sh", "-c", "exit 4"],
        argv0=[sys.executable, str(link)],
    )
    assert run.wait() == 4
