"""The router as a systemd service: socket activation, sd_notify, reload, drain.

Socket activation runs under Debian's real ``systemd-socket-activate``; sd_notify messages go to
a datagram socket the test owns, as systemd's would be.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, FakeUpstream, chat

from tests.support import ROUTER_SCRIPT
from tests.support.notify import NotifyReceiver
from tests.support.processes import Process, free_port
from tests.support.wire import SocketReader, chunk, read_reply, request_bytes

Factory = Callable[..., Any]

needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None and not os.environ.get("LLMHOP_REQUIRE_E2E"),
    reason="systemd-socket-activate is missing: apt-get install systemd (tests/run does)",
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyReceiver]:
    notify = NotifyReceiver(tmp_path / "notify.sock")
    yield notify
    notify.close()


class Service(Process):
    """The router started as systemd would: a process with a config file and an environment."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        super().__init__(argv, name="llmhop", env={"PATH": os.environ["PATH"], **env})

    def wait_for_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:  # type: ignore[override]
        return super().wait_for_line(pattern, timeout)

    def exit_status(self, timeout: float = WAIT * 2) -> int:
        """Wait for the process to end by itself."""
        return super().exit_status(timeout)

    @property
    def log(self) -> str:
        return self.output


@pytest.fixture
def services() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(argv: list[str], env: dict[str, str]) -> Service:
        service = Service(argv, env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


def router_argv(config: Path) -> list[str]:
    return [sys.executable, str(ROUTER_SCRIPT), "--config", str(config)]


def get(address: Any, path: str, family: int = socket.AF_INET) -> Any:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        sock.sendall(request_bytes("GET", path))
        return read_reply(SocketReader(sock))


def post(address: Any, path: str, body: bytes) -> Any:
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(request_bytes("POST", path, body))
        return read_reply(SocketReader(sock))


# --- socket activation ---------------------------------------------------------------------


@needs_socket_activate
def test_one_activated_tcp_listener(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, notify_socket: NotifyReceiver
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "c.json", {"port": 1, "models": {"m": {"url": upstream.url}}}
    )  # host/port are ignored under activation
    service = services(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=web",
            f"--setenv=NOTIFY_SOCKET={notify_socket.path}",
            *router_argv(config),
        ],
        {},
    )
    service.wait_for_line(r"Listening on 127\.0\.0\.1")
    # systemd-socket-activate starts the router on the first connection, which waits in the
    # backlog meanwhile: this request is the one that starts it.
    assert get(("127.0.0.1", port), "/health").json() == {"status": "ok", "models": 1}
    service.wait_for_line(rf"listening on 127\.0\.0\.1:{port} \(web\) with 1 model\(s\)")
    assert notify_socket.until(lambda m: m.startswith("READY=1")).startswith("READY=1\nSTATUS=")
    assert post(("127.0.0.1", port), "/v1/x", chat("m")).status == 200


@needs_socket_activate
def test_activated_tcp_and_unix_listeners_together(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, notify_socket: NotifyReceiver
) -> None:
    port = free_port()
    unix_path = str(tmp_path / "local.sock")
    config = write_config(tmp_path / "c.json", {"models": {"m": {"url": upstream.url}}})
    service = services(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "-l",
            unix_path,
            "--fdname=default:local",
            f"--setenv=NOTIFY_SOCKET={notify_socket.path}",
            *router_argv(config),
        ],
        {},
    )
    service.wait_for_line(r"Listening on .*local\.sock")
    assert get(unix_path, "/health", socket.AF_UNIX).status == 200
    ready = notify_socket.until(lambda m: m.startswith("READY=1"))
    assert f"127.0.0.1:{port}" in ready and f"unix:{unix_path}" in ready
    service.wait_for_line(rf"listening on unix:{re.escape(unix_path)} \(local\)")
    service.wait_for_line(rf"listening on 127\.0\.0\.1:{port} \(default\)")
    assert get(("127.0.0.1", port), "/health").status == 200
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(unix_path)
        sock.sendall(request_bytes("POST", "/v1/x", chat("m")))
        assert read_reply(SocketReader(sock)).status == 200
    # Clients on a unix socket have no IP: no X-Forwarded-For is made up for them.
    assert "x-forwarded-for" not in upstream.next_request().headers


@pytest.mark.parametrize("listen_fds", ["-1", "two", ""])
def test_bad_listen_fds_is_a_clear_error(tmp_path: Path, listen_fds: str) -> None:
    config = write_config(tmp_path / "c.json", {"models": {"m": {"url": "http://x"}}})
    # The router's pid is only known once it runs: exec through a shell that sets LISTEN_PID.
    script = f'LISTEN_PID=$$ LISTEN_FDS="{listen_fds}" exec "$@"'
    result = subprocess.run(
        ["sh", "-c", script, "sh", *router_argv(config)],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert result.returncode == 1
    assert "socket activation: LISTEN_FDS must be a non-negative integer" in result.stderr


def test_activation_variables_for_another_process_are_ignored(
    tmp_path: Path, upstream: FakeUpstream, services: Factory
) -> None:
    config = write_config(
        tmp_path / "c.json",
        {"host": "127.0.0.1", "port": 0, "models": {"m": {"url": upstream.url}}},
    )
    service = services(router_argv(config), {"LISTEN_PID": "1", "LISTEN_FDS": "3"})
    port = int(service.wait_for_line(r"listening on 127\.0\.0\.1:(\d+) ")[1])
    assert get(("127.0.0.1", port), "/health").status == 200


# --- sd_notify -------------------------------------------------------------------------------


def start_plain(
    tmp_path: Path, config: dict[str, Any], services: Factory, env: dict[str, str]
) -> tuple[Service, tuple[str, int], Path]:
    path = write_config(tmp_path / "config.json", {"host": "127.0.0.1", "port": 0, **config})
    service = services(router_argv(path), env)
    port = int(service.wait_for_line(r"listening on 127\.0\.0\.1:(\d+) ")[1])
    return service, ("127.0.0.1", port), path


def test_notify_messages_in_order(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, notify_socket: NotifyReceiver
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.path}
    service, address, path = start_plain(
        tmp_path, {"models": {"m": {"url": upstream.url}}}, services, env
    )
    ready = notify_socket.next()
    port = address[1]
    assert ready == f"READY=1\nSTATUS=1 model(s) on 127.0.0.1:{port}; 0 request(s) in flight"

    write_config(
        path,
        {
            "host": "127.0.0.1",
            "port": 0,
            "models": {"m": {"url": upstream.url}, "n": {"url": upstream.url}},
        },
    )
    service.signal(signal.SIGHUP)
    reloading = notify_socket.next()
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)
    usec = int(reloading.split("=")[-1])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < WAIT * 1_000_000
    assert (
        notify_socket.next()
        == f"READY=1\nSTATUS=2 model(s) on 127.0.0.1:{port}; 0 request(s) in flight"
    )

    # An idle keep-alive connection is simply closed on stop, with nothing on stderr.
    with socket.create_connection(address, timeout=WAIT) as idle:
        idle.sendall(request_bytes("GET", "/health"))
        reader = SocketReader(idle)
        assert read_reply(reader).status == 200
        service.signal(signal.SIGTERM)
        assert notify_socket.next() == "STOPPING=1\nSTATUS=draining 0 request(s)"
        assert reader.rest() == b""
    assert service.exit_status() == 0
    assert "Traceback" not in service.log and "Exception" not in service.log


def test_abstract_notify_socket(tmp_path: Path, upstream: FakeUpstream, services: Factory) -> None:
    name = f"llmhop-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        start_plain(
            tmp_path,
            {"models": {"m": {"url": upstream.url}}},
            services,
            {"NOTIFY_SOCKET": "@" + name},
        )
        assert sock.recv(4096).startswith(b"READY=1\n")


@pytest.mark.parametrize("notify", ["missing.sock", "@llmhop-test-nobody-listens"])
def test_unreachable_notify_socket_fails_the_start(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, notify: str
) -> None:
    """Ignored, it would leave systemd waiting out the start timeout, then restarting."""
    address = notify if notify.startswith("@") else str(tmp_path / notify)
    service, listening, _ = start_plain(
        tmp_path, {"models": {"m": {"url": upstream.url}}}, services, {"NOTIFY_SOCKET": address}
    )
    assert service.exit_status() == 1
    assert f"exiting: systemd cannot be told the router is ready (NOTIFY_SOCKET={address})" in (
        service.log
    )
    assert "Traceback" not in service.log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(listening, timeout=WAIT).close()


def test_watchdog_is_fed_at_half_the_interval(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, notify_socket: NotifyReceiver
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"}
    start_plain(tmp_path, {"models": {"m": {"url": upstream.url}}}, services, env)
    times = []
    for _ in range(4):
        notify_socket.until(lambda m: m == "WATCHDOG=1")
        times.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.1 < gap < 0.4 for gap in gaps), gaps


def test_no_notify_socket_sends_nothing(
    tmp_path: Path, upstream: FakeUpstream, services: Factory
) -> None:
    service, address, _ = start_plain(
        tmp_path, {"models": {"m": {"url": upstream.url}}}, services, {}
    )
    assert get(address, "/health").status == 200
    assert service.stop() == 0
    assert "notify" not in service.log


# --- reload ----------------------------------------------------------------------------------


class Load:
    """Clients sending requests in a loop from threads, counting every answer, until stopped."""

    def __init__(self, address: tuple[str, int], body: bytes, clients: int = 4):
        self.address = address
        self.body = body
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.answered = threading.Condition()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with socket.create_connection(self.address, timeout=WAIT) as sock:
            reader = SocketReader(sock)
            for _ in range(100_000):
                if self._stop.is_set():
                    return
                try:
                    sock.sendall(request_bytes("POST", "/v1/x", self.body))
                    status = read_reply(reader).status
                except (OSError, EOFError) as exc:
                    self.failures.append(repr(exc))
                    return
                with self.answered:
                    self.statuses.append(status)
                    self.answered.notify_all()

    def advance(self, count: int) -> None:
        """Wait until ``count`` more requests have been answered."""
        with self.answered:
            target = len(self.statuses) + count
            assert self.answered.wait_for(lambda: len(self.statuses) >= target, WAIT)

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(WAIT)


def test_reload_adds_models_and_survives_a_broken_config_without_losing_requests(
    tmp_path: Path, upstream_factory: Factory, services: Factory, notify_socket: NotifyReceiver
) -> None:
    first, second = upstream_factory(), upstream_factory()
    env = {"NOTIFY_SOCKET": notify_socket.path}
    config = {"host": "127.0.0.1", "port": 0, "models": {"a": {"url": first.url}}}
    service, address, path = start_plain(tmp_path, config, services, env)
    notify_socket.until(lambda m: m.startswith("READY=1"))
    load = Load(address, chat("a"))
    try:
        load.advance(50)
        assert post(address, "/v1/x", chat("b")).status == 404
        config["models"]["b"] = {"url": second.url}
        write_config(path, config)
        service.signal(signal.SIGHUP)
        notify_socket.until(lambda m: m.startswith("READY=1"))
        load.advance(50)
        assert post(address, "/v1/x", chat("b")).status == 200
        assert second.next_request().body == chat("b")

        write_config(path, {**config, "models": {"a": {"url": "ftp://nope"}}})
        service.signal(signal.SIGHUP)
        ready = notify_socket.until(lambda m: m.startswith("READY=1"))
        assert "last reload failed (1 problem(s))" in ready
        load.advance(50)
        service.wait_for_line(r"reload failed, the running config stays: config: models\.a\.url: ")
        assert post(address, "/v1/x", chat("b")).status == 200
        metrics = get(address, "/metrics").body.decode()
        assert 'llmhop_config_reloads_total{result="success"} 1' in metrics
        assert 'llmhop_config_reloads_total{result="failure"} 1' in metrics
    finally:
        load.stop()
    assert load.failures == []
    assert set(load.statuses) == {200}


# --- drain -----------------------------------------------------------------------------------


def test_sigterm_drains_a_stream_in_flight_and_refuses_new_connections(
    tmp_path: Path, services: Factory, notify_socket: NotifyReceiver
) -> None:
    upstream_listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{upstream_listener.getsockname()[1]}"
    env = {"NOTIFY_SOCKET": notify_socket.path}
    service, address, _ = start_plain(tmp_path, {"models": {"m": {"url": url}}}, services, env)
    notify_socket.until(lambda m: m.startswith("READY=1"))
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(request_bytes("POST", "/v1/chat/completions", chat("m", stream=True)))
        upstream_listener.settimeout(WAIT)
        upstream, _ = upstream_listener.accept()
        with upstream:
            SocketReader(upstream).until(b"\r\n\r\n")
            upstream.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n")
            )
            reader = SocketReader(client)
            assert reader.until(b"data: 1\n\n") is not None

            service.signal(signal.SIGTERM)
            assert notify_socket.until(lambda m: m.startswith("STOPPING=1")) == (
                "STOPPING=1\nSTATUS=draining 1 request(s)"
            )
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=WAIT).close()

            upstream.sendall(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            rest = reader.rest()
    upstream_listener.close()
    assert b"data: 2\n\n" in rest and rest.endswith(b"0\r\n\r\n")
    assert service.exit_status() == 0


def test_drain_timeout_cuts_what_is_left(
    tmp_path: Path, services: Factory, notify_socket: NotifyReceiver
) -> None:
    upstream_listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{upstream_listener.getsockname()[1]}"
    config = {"shutdownTimeout": 0.3, "models": {"m": {"url": url}}}
    service, address, _ = start_plain(
        tmp_path, config, services, {"NOTIFY_SOCKET": notify_socket.path}
    )
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(request_bytes("POST", "/v1/x", chat("m")))
        upstream_listener.settimeout(WAIT)
        upstream, _ = upstream_listener.accept()  # and never answers
        with upstream:
            service.signal(signal.SIGTERM)
            assert SocketReader(client).rest() == b""
            assert service.exit_status() == 0
    upstream_listener.close()
    assert "drain timeout (0.3s): cutting 1 request(s) still in flight" in service.log


# --- listeners without activation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "address"),
    [
        ({"host": "::1", "port": 0}, r"\[::1\]:(\d+)"),
        ({"listen": "[::1]:0"}, r"\[::1\]:(\d+)"),
        ({"listen": "127.0.0.1:0"}, r"127\.0\.0\.1:(\d+)"),
    ],
)
def test_tcp_listeners_ipv4_and_ipv6(
    tmp_path: Path, upstream: FakeUpstream, services: Factory, config: dict[str, Any], address: str
) -> None:
    path = write_config(tmp_path / "c.json", {**config, "models": {"m": {"url": upstream.url}}})
    service = services(router_argv(path), {})
    port = int(service.wait_for_line(rf"listening on {address} with 1 model\(s\)")[1])
    family = socket.AF_INET6 if "::" in address else socket.AF_INET
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    assert get((host, port), "/health", family).status == 200


def test_every_interface_means_ipv4_and_ipv6(
    tmp_path: Path, upstream: FakeUpstream, services: Factory
) -> None:
    path = write_config(tmp_path / "c.json", {"port": 0, "models": {"m": {"url": upstream.url}}})
    service = services(router_argv(path), {})
    first = service.wait_for_line(r"listening on (0\.0\.0\.0|\[::\]):(\d+) ")
    second = service.wait_for_line(
        r"listening on (?!" + re.escape(first[1]) + r")(0\.0\.0\.0|\[::\]):\d+ "
    )
    assert {first[1], second[1]} == {"0.0.0.0", "[::]"}
