"""services.llmhop.apiKeys: named keys rendered into the router's authTokens, checked by the
real router's `--check` as the build checks the config file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nix_harness import REPO, FailedAssertions, NixEvalError, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

ROUTER = REPO / "pkgs" / "llmhop" / "llmhop.py"
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
MODELS = {"qwen3-8b": {"url": "http://127.0.0.1:18001"}, "embed": {"url": "http://127.0.0.1:18002"}}


def llmhop(**options: Any) -> dict[str, Any]:
    options.setdefault("settings", {}).setdefault("models", MODELS)
    return {"services": {"llmhop": {"enable": True, **options}}}


def written(result: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    path = Path(result["etc"]["llmhop/llmhop.json"]["source"])
    return path, json.loads(path.read_text())


def router_check(path: Path) -> subprocess.CompletedProcess[str]:
    """What the config file's build-time check runs: `llmhop --check --config <file>`."""
    return subprocess.run(
        [sys.executable, "-I", str(ROUTER), "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assertions(config: dict[str, Any]) -> list[str]:
    with pytest.raises(FailedAssertions) as info:
        evaluate(config)
    return info.value.messages


def test_both_forms_render_after_the_plain_tokens() -> None:
    config = llmhop(
        credentials={"llmhop.chat-ui-token": "/run/secrets/chat-ui"},
        settings={"authTokens": ["plain-admin-token"]},
        apiKeys={
            "ci": {"hash": HASH, "models": ["qwen3-*", "embed"], "maxConcurrentRequests": 2},
            "chat-ui": {"tokenCredential": "llmhop.chat-ui-token"},
        },
    )
    result = evaluate(config)
    path, file = written(result)
    assert file["authTokens"] == [
        "plain-admin-token",
        {"name": "chat-ui", "token": "${cred:llmhop.chat-ui-token}"},
        {
            "name": "ci",
            "sha256": HASH,
            "models": ["qwen3-*", "embed"],
            "maxConcurrentRequests": 2,
        },
    ]
    # The token's credential is the router's, loaded by its unit; the store holds a reference.
    router = result["services"]["llmhop"]["serviceConfig"]
    assert router["LoadCredential"] == ["llmhop.chat-ui-token:/run/secrets/chat-ui"]
    assert file["metricsAuth"] is True
    check = router_check(path)
    assert (check.returncode, check.stderr) == (0, "config ok: 2 model(s)\n"), check.stderr


def test_keys_alone_turn_auth_and_metrics_auth_on() -> None:
    path, file = written(evaluate(llmhop(apiKeys={"family": {"hash": HASH.upper()}})))
    assert file["authTokens"] == [{"name": "family", "sha256": HASH.upper()}]
    assert file["metricsAuth"] is True
    assert router_check(path).returncode == 0
    # Without keys or tokens, auth (and so metrics auth) stays off.
    assert written(evaluate(llmhop()))[1]["metricsAuth"] is False


def test_a_key_naming_an_unknown_credential_fails() -> None:
    config = llmhop(
        credentials={"llmhop.a": "/run/secrets/a", "llmhop.b": {}},
        apiKeys={"chat-ui": {"tokenCredential": "llmhop.chat-ui-token"}},
    )
    assert assertions(config) == [
        "services.llmhop.apiKeys.chat-ui.tokenCredential: llmhop.chat-ui-token is not a"
        " credential of the router (services.llmhop.credentials has: llmhop.a, llmhop.b)."
    ]


@pytest.mark.parametrize(
    "key", [{}, {"hash": HASH, "tokenCredential": "t"}], ids=["neither", "both"]
)
def test_exactly_one_of_hash_and_token_credential(key: dict[str, Any]) -> None:
    config = llmhop(credentials={"t": {}}, apiKeys={"ci": key})
    assert assertions(config) == [
        "services.llmhop.apiKeys.ci: set exactly one of hash and tokenCredential."
    ]


@pytest.mark.parametrize("name", ["-ci", "a/b", "k" * 65, "ci key"])
def test_a_name_the_router_would_refuse_fails(name: str) -> None:
    assert assertions(llmhop(apiKeys={name: {"hash": HASH}})) == [
        f'services.llmhop.apiKeys."{name}": a key name is 1 to 64 letters, digits, ".", "_"'
        ' or "-", starting with a letter or digit.'
    ]


@pytest.mark.parametrize(
    ("key", "option"),
    [
        ({"hash": "not-hex"}, "hash"),
        ({"hash": HASH[:-1]}, "hash"),
        ({"hash": HASH, "models": []}, "models"),
    ],
    ids=["not-hex", "short", "no-models"],
)
def test_malformed_keys_are_refused_by_type(key: dict[str, Any], option: str) -> None:
    with pytest.raises(NixEvalError, match=rf"apiKeys\.ci\.{option}' is not of type"):
        evaluate(llmhop(apiKeys={"ci": key}))


# --- tokens in the store ----------------------------------------------------------------------

LITERAL_TOKEN_WARNING = (
    "services.llmhop.settings.authTokens holds a token written out, not a reference such as"
    ' "${cred:NAME}": it lands in the Nix store, where every local user can read it. Give it as'
    ' a credential (services.llmhop.credentials.NAME, written "${cred:NAME}"), or as an apiKeys'
    " entry with its hash."
)


def token_warnings(tokens: list[str]) -> list[str]:
    result = evaluate(llmhop(settings={"authTokens": tokens}))
    return [" ".join(w.split()) for w in result["warnings"]]


@pytest.mark.parametrize(
    "tokens",
    [
        ["plain-admin-token"],
        ["${cred:t}", "plain-admin-token"],
        # `$$` is a literal `$`: this is the text "${cred:t}", not a reference.
        ["$${cred:t}"],
        # Not a scheme the router reads secrets from.
        ["${vault:t}"],
    ],
)
def test_a_token_written_out_warns(tokens: list[str]) -> None:
    assert token_warnings(tokens) == [LITERAL_TOKEN_WARNING]


@pytest.mark.parametrize(
    "tokens",
    [[], ["${cred:t}"], ["${env:LLMHOP_TOKEN}", "${file:/run/secrets/t}"], ["$$${cred:t}"]],
)
def test_tokens_kept_out_of_the_store_do_not_warn(tokens: list[str]) -> None:
    assert token_warnings(tokens) == []


def test_the_docs_quote_the_warning() -> None:
    text = " ".join((REPO / "docs" / "module.md").read_text().split())
    assert LITERAL_TOKEN_WARNING in text
