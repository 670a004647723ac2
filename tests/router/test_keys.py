"""Per-key access: named keys (hashed or as secrets), model allow-lists, per-key limits."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, FakeUpstream, HeldUpstream, RunningRouter, chat, exchange, llmhop

from tests.support import ROUTER_SCRIPT
from tests.support.router import RouterProcess
from tests.support.wire import SocketReader, read_reply, request_bytes

Factory = Callable[..., Any]

CI_TOKEN = "ci-token-0123456789"
UI_TOKEN = "ui-token-abcdefghij"
ADMIN_TOKEN = "admin-token-zzzzzz"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


MODEL_NAMES = ("qwen3-8b", "qwen3-32b", "embed", "hosted", "secret-unlisted")


@pytest.fixture
def upstreams(upstream_factory: Factory) -> dict[str, FakeUpstream]:
    return {name: upstream_factory() for name in MODEL_NAMES}


def keys_config(upstreams: dict[str, FakeUpstream], **extra: Any) -> dict[str, Any]:
    models: dict[str, Any] = {name: {"url": up.url} for name, up in upstreams.items()}
    models["secret-unlisted"]["unlisted"] = True
    return {
        "authTokens": [
            ADMIN_TOKEN,
            {"name": "ci", "sha256": sha256(CI_TOKEN), "models": ["qwen3-*", "embed"]},
            {"name": "ui", "token": "${env:UI_TOKEN}", "models": ["qwen3-8b", "secret-*"]},
        ],
        "models": models,
        **extra,
    }


@pytest.fixture
def keyed(router_factory: Factory, upstreams: dict[str, FakeUpstream]) -> RunningRouter:
    return router_factory(keys_config(upstreams), environ={"UI_TOKEN": UI_TOKEN})


def error_of(reply: Any) -> dict[str, Any]:
    return reply.json()["error"]


@pytest.mark.parametrize("routing", ["body", "path"])
def test_a_scoped_key_reaches_its_models_and_no_others(
    keyed: RunningRouter, upstreams: dict[str, FakeUpstream], routing: str
) -> None:
    def ask(model: str, token: str) -> Any:
        path = f"/route/{model}/v1/chat/completions" if routing == "path" else "/v1/chat"
        return exchange(keyed, "POST", path, chat(model), bearer(token))

    for model in ("qwen3-8b", "qwen3-32b", "embed"):
        assert ask(model, CI_TOKEN).status == 200
        assert upstreams[model].next_request().body == chat(model)
    refused = ask("hosted", CI_TOKEN)
    unknown = ask("no-such-model", CI_TOKEN)
    # Exactly what an unknown model gets, so a key cannot probe which models exist.
    assert (refused.status, error_of(refused)["code"]) == (404, "model_not_found")
    assert refused.body.replace(b"hosted", b"X") == unknown.body.replace(b"no-such-model", b"X")
    assert upstreams["hosted"].received.empty()
    # A plain token reaches every model, unlisted ones included.
    assert ask("hosted", ADMIN_TOKEN).status == 200
    assert ask("secret-unlisted", ADMIN_TOKEN).status == 200
    assert ask("secret-unlisted", UI_TOKEN).status == 200
    assert ask("embed", UI_TOKEN).status == 404


def test_models_list_per_key(keyed: RunningRouter) -> None:
    def listed(token: str) -> list[str]:
        reply = exchange(keyed, "GET", "/v1/models", headers=bearer(token))
        assert reply.status == 200
        return [model["id"] for model in reply.json()["data"]]

    assert listed(ADMIN_TOKEN) == ["embed", "hosted", "qwen3-32b", "qwen3-8b"]
    assert listed(CI_TOKEN) == ["embed", "qwen3-32b", "qwen3-8b"]
    assert listed(UI_TOKEN) == ["qwen3-8b"]  # its unlisted model stays unlisted
    assert exchange(keyed, "GET", "/v1/models/embed", headers=bearer(CI_TOKEN)).status == 200
    assert exchange(keyed, "GET", "/v1/models/embed", headers=bearer(UI_TOKEN)).status == 404


def test_x_api_key_works_and_neither_credential_is_forwarded(
    keyed: RunningRouter, upstreams: dict[str, FakeUpstream]
) -> None:
    headers = {"x-api-key": CI_TOKEN}
    assert exchange(keyed, "POST", "/v1/chat", chat("embed"), headers).status == 200
    received = upstreams["embed"].next_request()
    assert "x-api-key" not in received.headers and "authorization" not in received.headers
    both = {**bearer(UI_TOKEN), "X-Api-Key": CI_TOKEN}
    # Authorization is read first: this request is the ui key's, which may not use embed.
    assert exchange(keyed, "POST", "/v1/chat", chat("embed"), both).status == 404
    assert exchange(keyed, "POST", "/v1/chat", chat("qwen3-8b"), both).status == 200
    received = upstreams["qwen3-8b"].next_request()
    assert CI_TOKEN.encode() not in received.head and UI_TOKEN.encode() not in received.head


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer(CI_TOKEN[:-1] + "X"),  # right length, wrong last character
        bearer(sha256(CI_TOKEN)),  # the hash is not the token
        {"x-api-key": "ci"},  # nor is the name
        {"Authorization": f"Basic {CI_TOKEN}"},
    ],
)
def test_anything_but_a_configured_token_gets_401(
    keyed: RunningRouter, headers: dict[str, str]
) -> None:
    reply = exchange(keyed, "POST", "/v1/chat", chat("embed"), headers)
    assert (reply.status, error_of(reply)["code"]) == (401, "invalid_api_key")


def test_a_keys_own_limit_answers_429_and_the_routers_503(
    router_factory: Factory, held: HeldUpstream
) -> None:
    router = router_factory(
        {
            "maxConcurrentRequests": 3,
            "authTokens": [
                ADMIN_TOKEN,
                {"name": "ci", "sha256": sha256(CI_TOKEN), "maxConcurrentRequests": 2},
            ],
            "models": {"m": {"url": held.url}},
        }
    )
    open_sockets = []
    try:
        for token in (CI_TOKEN, CI_TOKEN, ADMIN_TOKEN):
            sock = router.connect()
            open_sockets.append(sock)
            sock.sendall(request_bytes("POST", "/v1/x", chat("m"), bearer(token)))
            held.next_arrival()
        over_key = exchange(router, "POST", "/v1/x", chat("m"), bearer(CI_TOKEN))
        assert (over_key.status, error_of(over_key)["code"]) == (429, "rate_limit_exceeded")
        assert over_key.headers["retry-after"] == "1"
        assert "ci" in error_of(over_key)["message"]
        over_router = exchange(router, "POST", "/v1/x", chat("m"), bearer(ADMIN_TOKEN))
        assert (over_router.status, error_of(over_router)["code"]) == (
            503,
            "too_many_concurrent_requests",
        )
        metrics = exchange(router, "GET", "/metrics", headers=bearer(ADMIN_TOKEN)).body.decode()
        assert 'llmhop_key_requests_in_flight{key="ci"} 2' in metrics
        held.release_all()
        assert all(read_reply(SocketReader(sock)).status == 200 for sock in open_sockets)
    finally:
        for sock in open_sockets:
            sock.close()
    assert exchange(router, "POST", "/v1/x", chat("m"), bearer(CI_TOKEN)).status == 200


def test_credential_and_hash_forms(
    router_factory: Factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    (tmp_path / "ci-token").write_text(CI_TOKEN + "\n")
    router = router_factory(
        {
            "authTokens": [
                {"name": "ci", "token": "${cred:ci-token}"},
                {"name": "ui", "sha256": sha256(UI_TOKEN).upper()},
            ],
            "models": {"m": {"url": upstream.url}},
        },
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    for token in (CI_TOKEN, UI_TOKEN):
        assert exchange(router, "POST", "/v1/x", chat("m"), bearer(token)).status == 200


def test_key_names_in_the_log_and_metrics_never_a_token(
    tmp_path: Path, upstreams: dict[str, FakeUpstream]
) -> None:
    router = RouterProcess(keys_config(upstreams), tmp_path, env={"UI_TOKEN": UI_TOKEN})
    with router.connect() as sock:
        reader = SocketReader(sock)
        for model, token in (("embed", CI_TOKEN), ("embed", UI_TOKEN), ("qwen3-8b", UI_TOKEN)):
            sock.sendall(request_bytes("POST", "/v1/chat", chat(model), bearer(token)))
            read_reply(reader)
        sock.sendall(request_bytes("GET", "/metrics", None, bearer(ADMIN_TOKEN)))
        admin_view = read_reply(reader).body.decode()
        sock.sendall(request_bytes("GET", "/metrics", None, bearer(CI_TOKEN)))
        ci_view = read_reply(reader).body.decode()
    log = router.stop()
    keys = re.findall(r"model=(\S+) key=(\S+) route=\S+ status=(\d+)", log)
    assert keys == [
        ("embed", "ci", "200"),
        ("embed", "ui", "404"),
        ("qwen3-8b", "ui", "200"),
        ("-", "-", "200"),  # a plain token has no name
        ("-", "ci", "200"),
    ]
    assert 'llmhop_key_requests_total{key="ci",status="200"} 1' in admin_view
    assert 'llmhop_key_requests_total{key="ui",status="404"} 1' in admin_view
    # A scoped key sees its own series and its own models, no one else's.
    assert 'key="ci"' in ci_view and 'key="ui"' not in ci_view
    assert 'model="hosted"' not in ci_view and 'model="embed"' in ci_view
    for secret in (CI_TOKEN, UI_TOKEN, ADMIN_TOKEN, sha256(CI_TOKEN), sha256(UI_TOKEN)):
        assert secret not in log + admin_view + ci_view


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        ({"sha256": "0" * 64}, "authTokens[1].name", "is required"),
        ({"name": "has space", "sha256": "0" * 64}, "authTokens[1].name", "letters, digits"),
        ({"name": "a"}, "authTokens[1]", "exactly one of sha256 and token"),
        ({"name": "a", "sha256": "0" * 64, "token": "t"}, "authTokens[1]", "exactly one of"),
        ({"name": "a", "sha256": "abc"}, "authTokens[1].sha256", "64 hex digits"),
        ({"name": "a", "token": ""}, "authTokens[1].token", "must not be empty"),
        ({"name": "a", "token": "${env:NOPE}"}, "authTokens[1].token", "NOPE is not set"),
        ({"name": "a", "sha256": "0" * 64, "models": []}, "authTokens[1].models", "not be empty"),
        (
            {"name": "a", "sha256": "0" * 64, "models": ["m", 3]},
            "authTokens[1].models[1]",
            "non-empty string",
        ),
        (
            {"name": "a", "sha256": "0" * 64, "maxConcurrentRequests": -1},
            "authTokens[1].maxConcurrentRequests",
            "must not be negative",
        ),
        ({"name": "a", "sha256": "0" * 64, "extra": 1}, "authTokens[1].extra", "unknown key"),
        ({"name": "first", "sha256": "1" * 64}, "authTokens[1].name", "taken by authTokens[0]"),
        ({"name": "b", "sha256": "0" * 64}, "authTokens[1]", "same token as authTokens[0]"),
        (7, "authTokens[1]", "must be a string"),
    ],
)
def test_bad_keys_are_refused_with_their_key_path(entry: Any, path: str, message: str) -> None:
    text = json.dumps(
        {
            "authTokens": [{"name": "first", "sha256": "0" * 64}, entry],
            "models": {"m": {"url": "http://127.0.0.1:1"}},
        }
    )
    with pytest.raises(llmhop.ConfigError) as caught:
        llmhop.parse_config(text, llmhop.SecretResolver({}))
    assert any(p == path and message in m for p, m in caught.value.problems), caught.value


def test_hash_token_prints_the_configs_sha256() -> None:
    def run(stdin: bytes, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROUTER_SCRIPT), "hash-token", *args]
        return subprocess.run(
            command, input=stdin.decode(), capture_output=True, text=True, timeout=WAIT * 2
        )

    for given in (CI_TOKEN.encode(), CI_TOKEN.encode() + b"\n", CI_TOKEN.encode() + b"\r\n"):
        hashed = run(given)
        assert (hashed.returncode, hashed.stdout) == (0, sha256(CI_TOKEN) + "\n")
    for bad in (b"", b"\n", b" padded", b"bell\x07"):
        refused = run(bad)
        assert refused.returncode == 1 and refused.stdout == ""
        assert "hash-token" in refused.stderr
    assert run(b"", "--help").returncode == 0


def test_hash_token_refuses_a_short_token_unless_insisted_on() -> None:
    def run(stdin: bytes, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROUTER_SCRIPT), "hash-token", *args]
        return subprocess.run(
            command, input=stdin.decode(), capture_output=True, text=True, timeout=WAIT * 2
        )

    short = "x" * (llmhop.MIN_TOKEN_BYTES - 1)
    refused = run(short.encode())
    assert (refused.returncode, refused.stdout) == (1, "")
    assert "openssl rand -hex 32" in refused.stderr and "--allow-short" in refused.stderr
    insisted = run(short.encode(), "--allow-short")
    assert (insisted.returncode, insisted.stdout) == (0, sha256(short) + "\n")
    assert run(("x" * llmhop.MIN_TOKEN_BYTES).encode()).returncode == 0


def check_keys(tmp_path: Path, keys: list[Any]) -> subprocess.CompletedProcess[str]:
    """`llmhop --check` on a config with these authTokens; nothing is read."""
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"authTokens": keys, "models": {"m": {"url": "http://127.0.0.1:1"}}})
    )
    return subprocess.run(
        [sys.executable, str(ROUTER_SCRIPT), "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )


def test_check_names_each_bad_key_by_its_path(tmp_path: Path) -> None:
    checked = check_keys(
        tmp_path,
        [
            "${cred:admin-token}",
            {"name": "ci", "token": "${cred:ci-token}", "models": [""]},
            {"name": "ci", "sha256": "not hex"},
        ],
    )
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [
        "config: authTokens[1].models[0]: must be a non-empty string",
        "config: authTokens[2].name: is taken by authTokens[1]",
        "config: authTokens[2].sha256: must be 64 hex digits (llmhop hash-token)",
    ]


def test_check_tells_two_credential_keys_apart(tmp_path: Path) -> None:
    """Nothing is read by --check, yet two credentials are two tokens, not one repeated."""
    checked = check_keys(
        tmp_path,
        [
            "${cred:admin-token}",
            {"name": "ci", "token": "${cred:ci-token}"},
            {"name": "ui", "token": "${env:UI_TOKEN}"},
        ],
    )
    assert (checked.returncode, checked.stderr) == (0, "config ok: 1 model(s)\n")


def test_a_queue_timeout_names_no_model_the_key_may_not_see(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    secret, shared = held_factory(), held_factory()
    config = {
        "authTokens": [ADMIN_TOKEN, {"name": "ci", "sha256": sha256(CI_TOKEN), "models": ["b"]}],
        "models": {
            "secret-model": {"url": secret.url, "group": "gpu0"},
            "b": {"url": shared.url, "group": "gpu0", "queueTimeout": 0.2},
        },
    }
    router = router_factory(config)
    with router.connect() as holding:
        holding.sendall(
            request_bytes("POST", "/v1/chat", chat("secret-model"), bearer(ADMIN_TOKEN))
        )
        secret.next_arrival()
        refused = exchange(router, "POST", "/v1/chat", chat("b"), bearer(CI_TOKEN))
        assert refused.status == 503
        assert "secret-model" not in refused.body.decode()
        secret.allow()
        assert read_reply(SocketReader(holding)).status == 200


def test_metrics_count_a_hidden_model_as_an_unknown_one(keyed: RunningRouter) -> None:
    """A scoped key reading the metrics cannot tell a model it may not see from none."""
    assert exchange(keyed, "POST", "/v1/chat", chat("hosted"), bearer(CI_TOKEN)).status == 404
    assert exchange(keyed, "POST", "/v1/chat", chat("nothing"), bearer(CI_TOKEN)).status == 404
    text = exchange(keyed, "GET", "/metrics", None, bearer(ADMIN_TOKEN)).body.decode()
    assert not re.search(r'^llmhop_requests_total\{model="hosted"', text, re.M)
    assert re.search(
        r'^llmhop_requests_total\{model="-",route="body",status="404"\} 2$', text, re.M
    )
