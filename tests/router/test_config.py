from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, WAIT, llmhop

from tests.support import ROUTER_SCRIPT


def parse(config: Any, environ: dict[str, str] | None = None) -> llmhop.Config:
    text = config if isinstance(config, str) else json.dumps(config)
    return llmhop.parse_config(text, llmhop.SecretResolver(environ or {}))


def problems(config: Any, environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(llmhop.ConfigError) as caught:
        parse(config, environ)
    return caught.value.problems


MODELS = {"m": {"url": "http://127.0.0.1:8000"}}


def test_defaults() -> None:
    config = parse({"models": MODELS})
    assert config.listener == llmhop.Listener("", 8080)
    assert config.max_body_bytes == 100 * 1024 * 1024
    assert config.max_concurrent_requests == 8
    assert config.api_keys == ()
    assert config.connect_timeout == 30.0
    assert config.shutdown_timeout == 30.0


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [(":8080", "", 8080), ("127.0.0.1:9000", "127.0.0.1", 9000), ("[::1]:9000", "::1", 9000)],
)
def test_listen_forms(listen: str, host: str, port: int) -> None:
    assert parse({"listen": listen, "models": MODELS}).listener == llmhop.Listener(host, port)


@pytest.mark.parametrize("listen", ["8080", "::1:9000", "host:", "host:99999", "x:y"])
def test_bad_listen(listen: str) -> None:
    assert [path for path, _ in problems({"listen": listen, "models": MODELS})] == ["listen"]


def test_listen_with_host_or_port_is_an_error() -> None:
    assert problems({"listen": ":1", "port": 2, "models": MODELS}) == [
        ("listen", "cannot be combined with host/port")
    ]


@pytest.mark.parametrize(
    ("config", "path", "message"),
    [
        ({"models": MODELS, "extra": 1}, "extra", "unknown key"),
        ({"models": MODELS, "port": "80"}, "port", "must be an integer"),
        ({"models": MODELS, "port": 80.0}, "port", "must be an integer"),
        ({"models": MODELS, "port": True}, "port", "must be an integer"),
        ({"models": MODELS, "port": 65536}, "port", "must be in 0..65535"),
        ({"models": MODELS, "maxBodyBytes": -1}, "maxBodyBytes", "must not be negative"),
        ({"models": MODELS, "maxConcurrentRequests": -1}, "maxConcurrentRequests", "negative"),
        ({"models": MODELS, "connectTimeout": 0}, "connectTimeout", "positive"),
        ({"models": MODELS, "authTokens": "t"}, "authTokens", "must be a list"),
        ({"models": MODELS, "authTokens": [1]}, "authTokens[0]", "must be a string"),
        ({"models": MODELS, "authTokens": [""]}, "authTokens[0]", "must not be empty"),
        ({"models": MODELS, "authTokens": ["a\x01"]}, "authTokens[0]", "valid header value"),
        ({}, "models", "no models configured"),
        ({"models": {}}, "models", "no models configured"),
        ({"models": {"": {"url": "http://x"}}}, "models", "must not be empty"),
        ({"models": {"m": "http://x"}}, "models.m", "must be an object"),
        ({"models": {"m": {}}}, "models.m.url", "is required"),
        ({"models": {"m": {"url": "http://x", "unlisted": 1}}}, "models.m.unlisted", "boolean"),
        ({"models": {"m": {"url": "http://x", "typo": 1}}}, "models.m.typo", "unknown key"),
        ({"models": {"m": {"url": "http://x", "headers": []}}}, "models.m.headers", "object"),
    ],
)
def test_rejected_with_key_path(config: dict[str, Any], path: str, message: str) -> None:
    found = problems(config)
    assert [p for p, _ in found] == [path], found
    assert message in found[0][1]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "https://api.openai.com/v1",
        "unix:///run/x.sock",
        "http://[::1]:1/a?b=c",
    ],
)
def test_accepted_urls(url: str) -> None:
    parse({"models": {"m": {"url": url}}})


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8000",
        "http:///path",
        "http://user:pass@host",
        "http://host/#fragment",
        "unix://host/x.sock",
        "unix://relative.sock",
        "unix:///x.sock?q=1",
        "ftp://x",
        "http://host:99999",
        "http://host /x",
    ],
)
def test_rejected_urls(url: str) -> None:
    assert [path for path, _ in problems({"models": {"m": {"url": url}}})] == ["models.m.url"]


def test_upstream_url_parts() -> None:
    upstream = llmhop.parse_upstream_url("https://API.example.com/base/?x=1;y")
    assert (upstream.scheme, upstream.host, upstream.port) == ("https", "api.example.com", 443)
    assert (upstream.base_path, upstream.query) == ("/base", "x=1;y")
    assert upstream.host_header == b"api.example.com"
    assert llmhop.parse_upstream_url("http://[::1]:8000").host_header == b"[::1]:8000"
    assert llmhop.parse_upstream_url("http://h:80/").host_header == b"h"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Bad Name": "v"}, "not a valid header name"),
        ({"X-A": "line\nbreak"}, "valid header value"),
        ({"X-A": 5}, "must be a string"),
        ({"Content-Length": "5"}, "managed by the proxy"),
        ({"Connection": "close"}, "managed by the proxy"),
    ],
)
def test_rejected_headers(headers: dict[str, Any], message: str) -> None:
    name = next(iter(headers))
    found = problems({"models": {"m": {"url": "http://x", "headers": headers}}})
    assert found[0][0] == f"models.m.headers.{name}"
    assert message in found[0][1]


def test_case_duplicate_header_names_are_rejected() -> None:
    found = problems({"models": {"m": {"url": "http://x", "headers": {"X-A": "1", "x-a": "2"}}}})
    assert found == [("models.m.headers.x-a", "duplicates header 'X-A' (names ignore case)")]


def test_header_secret_error_has_the_full_key_path() -> None:
    config = {"models": {"m": {"url": "http://x", "headers": {"Authorization": "Bearer ${env:K}"}}}}
    assert problems(config) == [
        ("models.m.headers.Authorization", "${env:K}: environment variable K is not set")
    ]


def test_every_problem_is_reported() -> None:
    config = {"port": -1, "authTokens": ["$X"], "models": {"a": {}, "b": {"url": "ftp://x"}}}
    assert [path for path, _ in problems(config)] == [
        "port",
        "authTokens[0]",
        "models.a.url",
        "models.b.url",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"models": {}} {"x": 1}', "multiple JSON values in config"),
        ("[1]", "must be a JSON object"),
        ('{"models": ', "invalid JSON"),
    ],
)
def test_document_level_errors(text: str, message: str) -> None:
    found = problems(text)
    assert found[0][0] == ""
    assert message in found[0][1]


def test_configured_host_header_wins_and_is_not_duplicated() -> None:
    config = parse(
        {"models": {"m": {"url": "http://x:1", "headers": {"Host": "vhost", "X-A": "1"}}}}
    )
    (replica,) = config.models["m"].replicas
    assert replica.host_header == b"vhost"
    assert replica.headers == ((b"X-A", b"1"),)


# --- the command line ------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROUTER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        env={"PATH": os.environ["PATH"], **(env or {})},
        check=False,
    )


def write_config(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("flags", [("--check", "--config"), ("-check", "-config")])
def test_check_keeps_secrets_unread(tmp_path: Path, flags: tuple[str, str]) -> None:
    config = {
        "authTokens": ["${cred:llmhop.token}"],
        "models": {"m": {"url": "http://x", "headers": {"Authorization": "Bearer ${env:NOPE}"}}},
    }
    result = run_cli(flags[0], flags[1], write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert "config ok: 1 model(s)" in result.stderr


def test_check_fails_with_key_path(tmp_path: Path) -> None:
    config = {"models": {"m": {"url": "http://x", "headers": {"X-A": "$BARE"}}}}
    result = run_cli("--check", "--config", write_config(tmp_path, config))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "config: models.m.headers.X-A: '$BARE' is not a cred:, env: or file: reference; "
        "write $$ for a literal $"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("--check", "--config", str(tmp_path / "absent.json"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_startup_reports_every_secret_error_and_exits_1(tmp_path: Path) -> None:
    config = {
        "authTokens": ["${env:A}"],
        "models": {"m": {"url": "http://x", "headers": {"K": "${cred:c}"}}},
    }
    result = run_cli("--config", write_config(tmp_path, config))
    assert result.returncode == 1
    assert result.stderr.count("config: ") == 2


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"llmhop {llmhop.VERSION}"
    help_text = run_cli("--help").stdout
    assert "--config" in help_text and "--check" in help_text


def test_default_config_path_is_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"models": MODELS}))
    result = subprocess.run(
        [sys.executable, str(ROUTER_SCRIPT), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_example_config_runs_as_written() -> None:
    """examples/config.json, unchanged: listens on :8080 and answers /health."""
    example = ROOT / "examples" / "config.json"
    process = subprocess.Popen(
        [sys.executable, str(ROUTER_SCRIPT), "--config", str(example)],
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "OPENAI_KEY": "sk-example"},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert re.search(r"listening on \S+:8080 with 2 model\(s\)", line), line
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=WAIT) as response:
            assert json.load(response) == {"status": "ok", "models": 2}
    finally:
        process.terminate()
        try:
            status = process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT)
            raise
    assert status == 0


# --- errors that point at the line ----------------------------------------------------------


def test_a_key_given_twice_is_named_by_its_path_with_every_other_problem() -> None:
    text = (
        '{"port": 1, "models": {"a": {"url": "http://x:1"}, "a": {"url": "http://x:2"},'
        ' "b": {"url": "ftp://x", "url": "ftp://y"}}, "port": 2, "maxBodyBytes": "big"}'
    )
    found = problems(text)
    assert ("models.a", "appears more than once in its object") in found
    assert ("models.b.url", "appears more than once in its object") in found
    assert ("port", "appears more than once in its object") in found
    assert any(path == "maxBodyBytes" for path, _ in found)  # reported in the same run
    assert any(path == "models.b.url" and "http" in message for path, message in found)


def test_a_syntax_error_shows_file_line_column_and_a_caret(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "models": {\n    "m": {"url": "http://x:1",}\n  }\n}\n')
    with pytest.raises(llmhop.ConfigError) as caught:
        llmhop.load_config(str(path))
    ((where, message),) = caught.value.problems
    assert where == ""
    first, line, caret = message.split("\n")
    assert first.startswith(f"invalid JSON at {path}:3:31: ")
    assert line == "    " + '    "m": {"url": "http://x:1",}'  # indented under the message
    assert caret.index("^") == line.index("}")


def test_a_url_ending_in_v1_is_a_warning_with_the_fix() -> None:
    config = parse({"models": {"m": {"url": "http://127.0.0.1:8000/v1"}}})
    ((path, message),) = config.warnings
    assert path == "models.m.url"
    assert "/v1/v1/chat/completions" in message and "'http://127.0.0.1:8000'" in message
    assert parse({"models": MODELS}).warnings == ()


HOSTED = {"url": "https://api.example", "headers": {"Authorization": "Bearer ${env:K}"}}


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        ({"listen": ":8080", "models": {"hosted": HOSTED}}, True),
        ({"host": "0.0.0.0", "models": {"hosted": HOSTED}}, True),
        ({"listen": "127.0.0.1:8080", "models": {"hosted": HOSTED}}, False),
        ({"listen": "[::1]:8080", "models": {"hosted": HOSTED}}, False),
        ({"listen": ":8080", "authTokens": ["t"], "models": {"hosted": HOSTED}}, False),
        ({"listen": ":8080", "models": MODELS}, False),  # nothing injected
    ],
)
def test_check_warns_of_an_open_proxy_to_injected_credentials(
    tmp_path: Path, config: dict[str, Any], warned: bool
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, str(ROUTER_SCRIPT), "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    warning = "config: warning: authTokens: listening on"
    assert (warning in result.stderr) == warned, result.stderr
    if warned:
        assert "hosted injects credentials" in result.stderr


def test_help_tells_the_default_config_signals_exit_codes_and_docs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROUTER_SCRIPT), "--help"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    text = result.stdout
    for expected in ("default: config.json", "SIGHUP", "SIGTERM", "exit status", "docs/"):
        assert expected in text
    # The epilog is laid out as written: no command is broken across lines.
    assert "llmhop notify -url URL [-health-path PATH] [--] COMMAND..." in text
    assert "llmhop hash-token [--allow-short] < TOKEN-FILE" in text
