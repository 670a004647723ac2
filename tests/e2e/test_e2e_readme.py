"""The README's quick start, word for word: its first command runs the router on the example
config, a real llama.cpp server (the tests' tiny model) stands where the example expects the
local one, and the README's own curl gets a chat answer through the router."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from e2e_support import require_e2e_backend

require_e2e_backend()  # skips this module locally, fails it in CI, when the backend is missing

from e2e_support import ALPHA, REPO_ROOT, start_llama_server  # noqa: E402

from tests.support.processes import Process  # noqa: E402

README = REPO_ROOT / "README.md"
EXAMPLE = REPO_ROOT / "examples" / "config.json"
START_TIMEOUT = 15.0


def readme_commands() -> list[str]:
    """The commands of the README's shell blocks, continuation lines joined, comments gone."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def the_command(start: str, containing: str = "") -> str:
    (command,) = [c for c in readme_commands() if c.startswith(start) and containing in c]
    return command


def test_the_quick_start_gives_a_chat_answer_from_a_local_server(
    model_files: dict[str, Path], tmp_path: Path
) -> None:
    local = urlsplit(json.loads(EXAMPLE.read_text())["models"]["qwen3-8b"]["url"])
    server = start_llama_server(model_files[ALPHA], "qwen3-8b", tmp_path, port=local.port)
    router = Process(
        ["bash", "-c", the_command("OPENAI_KEY=")],
        name="README's router",
        cwd=REPO_ROOT,
        new_session=True,  # stopped as a whole: the shell and the router it runs
    )
    try:
        router.wait_for_line(r"listening on 127\.0\.0\.1:8080 with 2 model", START_TIMEOUT)

        def run(command: str) -> str:
            done = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True
            )
            return done.stdout

        health = the_command("curl -s localhost:8080/health")
        assert json.loads(run(health)) == {"status": "ok", "models": 2}
        answer = json.loads(run(the_command("curl -s localhost:8080/v1/chat", '"qwen3-8b"')))
        assert answer["object"] == "chat.completion"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
    finally:
        router.stop()
        server.managed.stop()
