"""The harness' systemd (systemd_ns.py): it boots as PID 1 in namespaces, runs units, reports a
failing one and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from systemd_ns import SystemdNamespace

pytestmark = [pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

HELLO = {
    "files": {
        "hello.service": (
            "[Unit]\nDescription=hello\n[Service]\n"
            "ExecStart=/bin/sh -c 'echo hello from a unit; exec sleep infinity'\n"
        ),
        "broken.service": (
            "[Unit]\nDescription=broken\n[Service]\nType=notify\nExecStart=/bin/false\n"
        ),
    },
    "links": {"multi-user.target.wants/hello.service": "hello.service"},
}


def test_boots_runs_units_and_leaves_nothing_behind() -> None:
    host_run = sorted(os.listdir("/run"))
    with SystemdNamespace(HELLO) as ns:
        assert ns.pid is not None
        assert ns.boot_status  # systemd's STATUS= from the READY=1 notification
        assert ns.systemctl("is-system-running").stdout.strip() == "running"
        assert ns.show("hello.service", "ActiveState")["ActiveState"] == "active"
        assert "hello from a unit" in ns.wait_for_journal("hello.service", "hello from a unit")
        # systemd is PID 1 of its own PID namespace and sees only its own processes.
        assert ns.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        cgroup, work, pid = ns.cgroup, ns.work, ns.pid
        assert cgroup is not None and cgroup.is_dir()
    assert not cgroup.exists()
    assert work is not None and not work.exists()
    assert not Path(f"/proc/{pid}").exists()
    assert sorted(os.listdir("/run")) == host_run


def test_a_failing_unit_is_reported() -> None:
    with SystemdNamespace(HELLO) as ns:
        start = ns.systemctl("start", "broken.service")
        assert start.returncode != 0
        assert ns.systemctl("is-failed", "broken.service").stdout.strip() == "failed"
        assert ns.systemctl("is-system-running").stdout.strip() == "degraded"
