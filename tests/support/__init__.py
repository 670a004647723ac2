"""What the test suites and the benchmark share, imported as `tests.support` (pyproject.toml
puts the repository on pytest's path; `python -m bench` runs from it):

- processes: `Process` (a child whose output is read or logged, stopped and reaped for sure),
  `free_port`, `wait_until`, `cpu_seconds`;
- router: `RouterProcess`, the router as users run it;
- notify: `NotifyReceiver`, the systemd side of sd_notify;
- wire: raw HTTP/1.1 on sockets (`SocketReader`, `request_bytes`, `read_reply`, …) and
  `request`, one exchange with http.client over TCP or a unix socket;
- fake_engine.py: the fake model servers (llama-server, vLLM, SGLang, the SGL Model Gateway,
  a hosted provider), a standalone script (`FAKE_ENGINE`), which the VM checks install too.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROUTER_SCRIPT = REPO / "pkgs" / "llmhop" / "llmhop.py"
FAKE_ENGINE = Path(__file__).resolve().with_name("fake_engine.py")
