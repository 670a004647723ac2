"""Boot a real systemd as PID 1 in fresh namespaces, run a scenario, tear it down.

systemd (the host's, 252 on Debian 12) runs as PID 1 of a new PID namespace, with its own
mount, cgroup, network, UTS and IPC namespaces:

- a child cgroup of ours (cgroup v2) becomes the root of its cgroup namespace, and a fresh
  cgroup2 is mounted on /sys/fs/cgroup, so systemd manages a tree of its own;
- /run and /var are fresh tmpfs, so runtime state, StateDirectory= and DynamicUser= data and
  the journal vanish with the namespace; /dev/console is a file in the work directory, /etc/
  passwd and /etc/group are generated copies when the scenario declares users;
- the network namespace has only `lo`, so listeners never touch the host's ports;
- units come from a private directory (SYSTEMD_UNIT_PATH) holding stub targets, the host's
  journald units and the scenario's units; generators are switched off;
- `container=llmhop-test` tells systemd it runs in a container (it does not try to mount or
  load anything a real boot would); NOTIFY_SOCKET gives us READY=1 once the boot is done.

The scenario talks to it with `systemctl`, `journalctl` and any command through `nsenter`
(its private bus is /run/systemd/private in its mount namespace). Teardown asks systemd to
exit, kills the namespace if it does not within the timeout, removes the cgroup and the work
directory and leaves nothing behind on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

STUB_TARGETS: dict[str, str] = {
    "sysinit.target": "Wants=local-fs.target\nAfter=local-fs.target\n",
    "local-fs.target": "",
    "basic.target": (
        "Requires=sysinit.target\n"
        "Wants=sockets.target timers.target paths.target slices.target\n"
        "After=sysinit.target sockets.target timers.target paths.target slices.target\n"
    ),
    "sockets.target": "",
    "timers.target": "",
    "paths.target": "",
    "slices.target": "",
    "network-pre.target": "",
    "network.target": "After=network-pre.target\n",
    "network-online.target": "After=network.target\n",
    "multi-user.target": "Requires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n",
    "default.target": "Requires=multi-user.target\nAfter=multi-user.target\nAllowIsolate=yes\n",
    "shutdown.target": "DefaultDependencies=no\nRefuseManualStart=yes\n",
    "umount.target": "DefaultDependencies=no\n",
    "final.target": "DefaultDependencies=no\nAfter=shutdown.target umount.target\n",
    "exit.target": (
        "DefaultDependencies=no\nRequires=systemd-exit.service\n"
        "After=systemd-exit.service\nAllowIsolate=yes\n"
    ),
    # As systemd's own: no [Service]; succeeding means exiting the container.
    "systemd-exit.service": (
        "DefaultDependencies=no\nRequires=shutdown.target umount.target final.target\n"
        "After=shutdown.target umount.target final.target\nSuccessAction=exit-force\n"
    ),
}

JOURNAL_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
SYSTEMD_BINARIES = (Path("/usr/lib/systemd/systemd"), Path("/lib/systemd/systemd"))

JOURNALD_CONF = (
    "[Journal]\nStorage=volatile\nReadKMsg=no\n"
    "ForwardToSyslog=no\nForwardToKMsg=no\nForwardToConsole=no\nForwardToWall=no\n"
)

# Work directories and package stand-ins live here: not under /tmp (PrivateTmp= hides it from
# services), /run or /var (tmpfs in the namespace) or /home (ProtectHome=).
SCRATCH = Path("/opt/llmhop-test")

NAMESPACES = ("--mount", "--pid", "--net", "--uts", "--ipc", "--cgroup")


class SystemdUnavailable(Exception):
    """This machine cannot boot systemd in namespaces; the message says why."""


def _cgroup2_root() -> Path:
    """Our own cgroup in the cgroup v2 hierarchy (unified or hybrid layout)."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    cgroup2 = [line.split()[4] for line in mounts if " - cgroup2 " in line]
    if not cgroup2:
        raise SystemdUnavailable("no cgroup2 file system is mounted")
    own = next(
        line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::"
    )
    root = Path(cgroup2[0]) / own.lstrip("/")
    if not os.access(root, os.W_OK):
        raise SystemdUnavailable(f"cgroup {root} is not writable")
    return root


def scratch_dir(prefix: str) -> Path:
    """A fresh directory that units can see (see SCRATCH)."""
    SCRATCH.mkdir(mode=0o755, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH))
    path.chmod(0o755)
    return path


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        SCRATCH.rmdir()  # only once the last one is gone


def unavailable() -> str | None:
    """Why the real-systemd fixture cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (to create namespaces and a cgroup)"
    for tool in ("unshare", "nsenter", "mount", "ip", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; prepare with: bash tests/nix/setup.sh"
    if not any(p.exists() for p in SYSTEMD_BINARIES):
        return "systemd is not installed; prepare with: bash tests/nix/setup.sh"
    try:
        _cgroup2_root()
    except SystemdUnavailable as exc:
        return str(exc)
    return None


def passwd_entries(users: dict[str, Any], groups: dict[str, Any]) -> tuple[list[str], list[str]]:
    """/etc/passwd and /etc/group lines for the evaluated users.users and users.groups that
    the host does not have, with ids allocated from 999 down as NixOS does for system users."""
    host_passwd = Path("/etc/passwd").read_text().splitlines()
    host_group = Path("/etc/group").read_text().splitlines()
    taken_uids = {int(line.split(":")[2]) for line in host_passwd if line.count(":") >= 6}
    taken_gids = {int(line.split(":")[2]) for line in host_group if line.count(":") >= 3}
    host_users = {line.split(":")[0] for line in host_passwd}
    host_groups = {line.split(":")[0] for line in host_group}

    def allocate(taken: set[int]) -> int:
        uid = 999
        while uid in taken:
            uid -= 1
        taken.add(uid)
        return uid

    gids: dict[str, int] = {}
    group_lines = []
    for name, group in sorted(groups.items()):
        if name in host_groups:
            continue
        gid = group.get("gid") or allocate(taken_gids)
        taken_gids.add(gid)
        gids[name] = gid
        members = sorted(
            set(group.get("members", []))
            | {u for u, d in users.items() if name in d.get("extraGroups", [])}
        )
        group_lines.append(f"{name}:x:{gid}:{','.join(members)}")
    passwd_lines = []
    for name, user in sorted(users.items()):
        if name in host_users:
            continue
        uid = user.get("uid") or allocate(taken_uids)
        taken_uids.add(uid)
        gid = gids.get(user.get("group", ""), 65534)
        home = user.get("home", "/var/empty")
        passwd_lines.append(
            f"{name}:x:{uid}:{gid}:{user.get('description', '')}:{home}:/usr/sbin/nologin"
        )
    return passwd_lines, group_lines


class SystemdNamespace:
    """A booted systemd in fresh namespaces. Use as a context manager.

    units: rendered units of one scope ({files: {path: text}, links: {link: unit}}), as in
        harness.evaluate(...)["units"]["system"]; units linked into multi-user.target.wants or
        sockets.target.wants start at boot, as on NixOS.
    users, groups: evaluated users.users / users.groups to add to /etc/passwd and /etc/group.
    etc: files to add below /etc, {relative path: target}, as symlinks (NixOS'
        environment.etc.<name>.source); an overlay over the host's /etc holds them.
    """

    def __init__(
        self,
        units: dict[str, Any] | None = None,
        *,
        users: dict[str, Any] | None = None,
        groups: dict[str, Any] | None = None,
        etc: dict[str, str] | None = None,
        journal: bool = True,
        boot_timeout: float = 60,
        stop_timeout: float = 30,
    ) -> None:
        self.units = units or {"files": {}, "links": {}}
        self.users = users or {}
        self.groups = groups or {}
        self.etc = etc or {}
        self.journal_enabled = journal
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.work: Path | None = None
        self.cgroup: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # systemd's PID as the host sees it
        self.boot_status = ""

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> SystemdNamespace:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_units(self, unit_dir: Path) -> None:
        unit_dir.mkdir(parents=True)
        for name, body in STUB_TARGETS.items():
            (unit_dir / name).write_text(f"[Unit]\nDescription=stub {name}\n{body}")
        if self.journal_enabled:
            wants = unit_dir / "sockets.target.wants"
            wants.mkdir()
            for name in JOURNAL_UNITS:
                source = next((d / name for d in SYSTEM_UNIT_DIRS if (d / name).exists()), None)
                if source is None:
                    raise SystemdUnavailable(f"the host has no {name}")
                (unit_dir / name).write_text(source.read_text())
                if name.endswith(".socket"):
                    (wants / name).symlink_to(unit_dir / name)
        for name, text in self.units["files"].items():
            path = unit_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for link, target in self.units["links"].items():
            path = unit_dir / link
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(unit_dir / target)

    def _boot_script(self, work: Path) -> str:
        systemd = next(p for p in SYSTEMD_BINARIES if p.exists())
        passwd, group = passwd_entries(self.users, self.groups)
        binds = ""
        if self.etc:
            for name, target in self.etc.items():
                link = work / "etc" / name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target)
            binds += f"mount -t overlay overlay -o lowerdir={work}/etc:/etc /etc\n"
        if passwd or group:
            (work / "passwd").write_text(
                Path("/etc/passwd").read_text().rstrip("\n")
                + "\n"
                + "".join(line + "\n" for line in passwd)
            )
            (work / "group").write_text(
                Path("/etc/group").read_text().rstrip("\n")
                + "\n"
                + "".join(line + "\n" for line in group)
            )
            binds += "".join(f"mount --bind {work}/{f} /etc/{f}\n" for f in ("passwd", "group"))
        (work / "journald.conf").write_text(JOURNALD_CONF)
        (work / "console").write_text("")
        (work / "empty").mkdir()
        env = {
            "container": "llmhop-test",
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "NOTIFY_SOCKET": str(work / "notify"),
            "SYSTEMD_UNIT_PATH": str(work / "units"),
            "SYSTEMD_GENERATOR_PATH": str(work / "empty"),
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(work / "empty"),
        }
        env_args = " ".join(f"{k}={v}" for k, v in env.items())
        return f"""set -eu
# PID 1 of the new PID namespace, in the new mount/cgroup/net/uts/ipc namespaces.
# Until /run is our own tmpfs, no mtab bookkeeping (-n): libmount would create /run/mount on
# the host's /run.
mount -n --make-rprivate /
mount -n -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/systemd/journald.conf.d
cp {work}/journald.conf /run/systemd/journald.conf.d/llmhop-test.conf
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /var
mkdir -p /var/lib /var/cache /var/log /var/tmp
chmod 1777 /var/tmp
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount --bind {work}/console /dev/console
{binds}# As on a booted system (systemd skips this in a container): mounts systemd makes in a
# child namespace, such as a unit's credentials, propagate back. Peers stay in here: /
# was made private first.
mount --make-rshared /
ip link set lo up
hostname llmhop-test
exec env -i {env_args} {systemd} --system --log-target=journal --show-status=no
"""

    def start(self) -> None:
        reason = unavailable()
        if reason:
            raise SystemdUnavailable(reason)
        self.work = scratch_dir("systemd-")
        self._write_units(self.work / "units")
        (self.work / "boot.sh").write_text(self._boot_script(self.work))

        self.cgroup = _cgroup2_root() / f"llmhop-test-{self.work.name}"
        self.cgroup.mkdir()

        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            notify.bind(str(self.work / "notify"))
            self.proc = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    # Join the new cgroup first: it becomes the root of the cgroup namespace.
                    'echo $$ > "$1/cgroup.procs" && shift && exec "$@"',
                    "sh",
                    str(self.cgroup),
                    "unshare",
                    *NAMESPACES,
                    "--fork",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    "sh",
                    str(self.work / "boot.sh"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=open(self.work / "boot.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._await_ready(notify)
        finally:
            notify.close()
        if self.journal_enabled:
            # journald is socket-activated; once it is up its runtime journal exists and
            # `journalctl --follow` can watch it.
            self.systemctl("start", "systemd-journald.service", check=True)

    def _await_ready(self, notify: socket.socket) -> None:
        """Wait for systemd's READY=1 (sent when the boot transaction is done)."""
        deadline = time.monotonic() + self.boot_timeout
        ucred = struct.calcsize("3i")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"systemd did not boot within {self.boot_timeout}s\n{self.log()}"
                )
            notify.settimeout(min(remaining, 1.0))
            try:
                data, ancdata, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(ucred))
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"systemd exited while booting\n{self.log()}") from None
                continue
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    self.pid = struct.unpack("3i", payload[:ucred])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.boot_status = fields.get("STATUS", self.boot_status)
            if fields.get("READY") == "1" and self.pid is not None:
                return

    def stop(self) -> None:
        """Exit systemd (or kill the namespace) and remove everything the run created."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.pid is not None:
                    self.systemctl("--no-block", "exit", timeout=self.stop_timeout)
                try:
                    self.proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    # Killing PID 1 of a PID namespace kills every process in it.
                    with contextlib.suppress(ProcessLookupError):
                        if self.pid is not None:
                            os.kill(self.pid, signal.SIGKILL)
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=self.stop_timeout)
        finally:
            self._remove_cgroup()
            if self.work is not None:
                remove_scratch(self.work)

    def _remove_cgroup(self) -> None:
        if self.cgroup is None or not self.cgroup.exists():
            return
        events = self.cgroup / "cgroup.events"
        if "populated 1" in events.read_text():
            (self.cgroup / "cgroup.kill").write_text("1")
            # cgroup.events signals a change of "populated" with POLLPRI.
            with open(events) as handle:
                poller = select.poll()
                poller.register(handle, select.POLLPRI)
                deadline = time.monotonic() + self.stop_timeout
                while "populated 1" in events.read_text():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"{self.cgroup} still has processes")
                    poller.poll(remaining * 1000)
        for directory in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
            if directory.is_dir():
                directory.rmdir()
        self.cgroup.rmdir()

    # -- talking to it -------------------------------------------------------------------

    def nsenter(self) -> list[str]:
        assert self.pid is not None, "systemd is not running"
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "-C", "--"]

    def run(
        self, *cmd: str, timeout: float = 60, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside all the namespaces (as root, outside any unit)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_COLOR": "0"}
        return subprocess.run(
            [*self.nsenter(), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
            env=env,
        )

    def systemctl(
        self, *args: str, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "systemctl", "--no-pager", "--no-ask-password", *args, timeout=timeout, check=check
        )

    def install_units(self, units: dict[str, Any]) -> None:
        """Put another evaluation's unit files in place of the booted ones and reload, as a
        switch to another configuration does; which units restart is the caller's to say."""
        assert self.work is not None, "systemd is not running"
        for name, text in units["files"].items():
            path = self.work / "units" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.systemctl("daemon-reload", check=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"--property={p}" for p in props], check=True)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def state(self, unit: str) -> str:
        """The unit's ActiveState: active, activating, inactive, failed, …"""
        return self.show(unit, "ActiveState")["ActiveState"]

    def journal(self, unit: str | None = None) -> str:
        args = ["journalctl", "--no-pager", "--quiet", "--output=short"]
        if unit:
            args += ["--unit", unit]
        return self.run(*args).stdout

    def wait_for_journal(self, unit: str, text: str, timeout: float = 30) -> str:
        """Follow `unit`'s journal until a line contains `text`; returns that line."""
        proc = subprocess.Popen(
            [
                *self.nsenter(),
                "journalctl",
                "--no-pager",
                "--quiet",
                "--follow",
                "--lines=all",
                "--output=cat",
                "--unit",
                unit,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            pending = b""
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([fd], [], [], remaining)
                if not ready:
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if text in line.decode(errors="replace"):
                        return line.decode(errors="replace")
            raise TimeoutError(f"{text!r} not in the journal of {unit}:\n{self.journal(unit)}")
        finally:
            # nsenter forked journalctl into the namespace: stop journalctl and let nsenter
            # reap it (a zombie left in the namespace would hold up systemd's exit).
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError):
                for child in children.read_text().split():
                    os.kill(int(child), signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def http(
        self,
        url: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        unix_socket: str | None = None,
        timeout: float = 30,
    ) -> tuple[int, str]:
        """Send one request from inside the network namespace: (status, body). With
        `unix_socket`, connect to that socket; `url` then gives only the path."""
        script = (
            "import http.client, json, socket, sys, urllib.parse\n"
            "url, method, body, headers, sock, timeout = json.loads(sys.argv[1])\n"
            "parts = urllib.parse.urlsplit(url)\n"
            "if sock:\n"
            "    conn = http.client.HTTPConnection('localhost', timeout=timeout)\n"
            "    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    conn.sock.settimeout(timeout)\n"
            "    conn.sock.connect(sock)\n"
            "else:\n"
            "    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)\n"
            "path = (parts.path or '/') + ('?' + parts.query if parts.query else '')\n"
            "data = body.encode('latin-1') if body is not None else None\n"
            "conn.request(method, path, body=data, headers=headers)\n"
            "response = conn.getresponse()\n"
            "print(response.status)\n"
            "sys.stdout.write(response.read().decode(errors='replace'))\n"
        )
        payload = None if body is None else body.decode("latin-1")
        arg = json.dumps([url, method, payload, headers or {}, unix_socket, timeout])
        out = self.run("python3", "-I", "-c", script, arg, timeout=timeout + 10, check=True)
        status, _, text = out.stdout.partition("\n")
        return int(status), text

    def log(self) -> str:
        if self.work is None:
            return ""
        parts = []
        for name in ("boot.log", "console"):
            path = self.work / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)


def booted(result: dict[str, Any]) -> SystemdNamespace:
    """A namespace booting an evaluated configuration: its system units, users and /etc."""
    etc = {name: entry["source"] for name, entry in result["etc"].items() if entry["source"]}
    return SystemdNamespace(
        result["units"]["system"], users=result["users"], groups=result["groups"], etc=etc
    )
