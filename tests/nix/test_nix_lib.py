"""The flake's `lib` (modules/lib): the pure helpers, called with nixpkgs' lib as pinned."""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any

import pytest
from nix_harness import REPO, NixEvalError, eval_expression, locked_store_path

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def call(expression: str) -> Any:
    """`expression` with `l` bound to the flake's lib."""
    lib = f"import {locked_store_path('nixpkgs-lib')}/lib"
    return eval_expression(f"let l = import {REPO}/modules/lib ({lib}); in {expression}")


def test_cli_flags_in_each_dialect() -> None:
    vllm = call(
        """l.renderCliArgs "vllm" {
          max-model-len = 8192;
          enable-prefix-caching = false;
          lora-paths = [ "x=/p/x" "y=/p/y" ];
          speculative-config = { model = "d"; num_speculative_tokens = 3; };
          temperature = 0.6;
          dropped = null;
        }"""
    )
    assert vllm == [
        "--no-enable-prefix-caching",
        "--lora-paths",
        "x=/p/x",
        "y=/p/y",
        "--max-model-len",
        "8192",
        "--speculative-config",
        json.dumps({"model": "d", "num_speculative_tokens": 3}, separators=(",", ":")),
        "--temperature",
        "0.6",
    ]
    llama = call(
        'l.renderCliArgs "llama-cpp" { lora = [ "a" "b" ]; no-mmap = false; jinja = true; }'
    )
    assert llama == ["--jinja", "--lora", "a", "--lora", "b", "--mmap"]
    sglang = call(
        """l.renderCliArgsShell "sglang" {
          port = 30000; worker-urls = [ "http://a" "http://b" ]; enable-metrics = false;
        }"""
    )
    assert sglang == "'--port=30000' --worker-urls http://a http://b"


def test_an_unknown_dialect_is_refused() -> None:
    with pytest.raises(NixEvalError, match='unknown CLI dialect "go"'):
        call('l.renderCliArgs "go" { x = false; }')


@pytest.mark.parametrize(
    ("host", "accepted"),
    [
        ("", True),
        ("0.0.0.0", True),
        ("::", True),
        ("fe80::1", True),
        ("2001:db8:0:0:0:0:0:1", True),
        ("256.1.1.1", False),
        ("localhost", False),
        ("[::1]", False),
        ("1:2:3:4:5:6:7:8:9", False),
    ],
)
def test_listen_hosts_are_ip_literals(host: str, accepted: bool) -> None:
    assert call(f"l.isListenHost {json.dumps(host)}") is accepted


def test_credential_references() -> None:
    resolved = call(
        'l.resolveCredentialRefs { names = [ "a" ]; directory = "%d"; }'
        ' { k = [ "x ${cred:a}" ]; n = 1; }'.replace("${", "\\${")
    )
    assert resolved == {"k": ["x %d/a"], "n": 1}
    with pytest.raises(NixEvalError, match=r"\$\{cred:missing\} names no credential"):
        call(
            'l.resolveCredentialRefs { names = [ "a" ]; directory = "%d"; }'
            ' { key = "${cred:missing}"; }'.replace("${", "\\${")
        )


# systemd's rule for a DynamicUser= name (valid_user_group_name without relaxation).
SYSTEMD_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")


def generated_names(count: int) -> list[str]:
    """Names as users write them and worse: model names with dots, runs of one character,
    leading digits and dashes, non-ASCII letters, from empty to far beyond 31 characters."""
    rng = random.Random(28)
    alphabets = [
        string.ascii_lowercase + string.digits + ".-",
        string.ascii_letters + string.digits + "._-",
        string.printable.strip(),
        "aé.ü-ß0😀_Ω",
        "ab-.",
    ]
    names = []
    for _ in range(count):
        alphabet = rng.choice(alphabets)
        length = rng.choice([0, 1, 2, 20, 21, 22, 23, 30, 31, 32, 40, rng.randrange(80)])
        names.append("".join(rng.choice(alphabet) for _ in range(length)))
    return names


def test_dynamic_user_names_are_valid_and_distinct(tmp_path: Path) -> None:
    edges = [
        "llama-cpp-qwen3-0.6b",
        "llama-cpp-qwen3-0-6b",
        "llama-cpp-qwen3-coder-30b-a3b-instruct",
        "llama-cpp-" + "a" * 21,
        "llama-cpp-" + "a" * 22,
        "0abc",
        "-abc",
        "_abc",
        "",
        "a.b",
        "a-b",
    ]
    names = sorted(set(edges + generated_names(600)))
    listing = tmp_path / "names.json"
    listing.write_text(json.dumps(names))
    users = call(f"map l.dynamicUserName (builtins.fromJSON (builtins.readFile {listing}))")
    assert len(users) == len(names)
    for name, user in zip(names, users, strict=True):
        assert SYSTEMD_USER_NAME.fullmatch(user), (name, user)
        # A name systemd takes is kept; only a refused one is rewritten.
        assert (user == name) == bool(SYSTEMD_USER_NAME.fullmatch(name)), (name, user)
    assert len(set(users)) == len(names), "two names share a user"
    assert users[names.index("llama-cpp-qwen3-0.6b")] == "llama-cpp-qwen3-0-6b-5c84fde2"
