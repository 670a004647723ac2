from __future__ import annotations

from pathlib import Path

import pytest
from support import llmhop


def expand(
    value: str, environ: dict[str, str] | None = None, **kwargs: bool
) -> tuple[str, list[str]]:
    return llmhop.expand_secrets(value, llmhop.SecretResolver(environ or {}, **kwargs))


def test_env_reference_is_replaced() -> None:
    assert expand("Bearer ${env:KEY}", {"KEY": "sk-1"}) == ("Bearer sk-1", [])


def test_env_value_is_not_trimmed() -> None:
    assert expand("${env:KEY}", {"KEY": "a\n"}) == ("a\n", [])


def test_unset_env_variable_is_an_error() -> None:
    _, errors = expand("${env:MISSING}")
    assert errors == ["${env:MISSING}: environment variable MISSING is not set"]


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (b"secret\n", "secret"),
        (b"secret\n\n", "secret\n"),
        (b"a b\nc\r\n", "a b\nc"),
        (b"plain", "plain"),
        (b"crlf\r\n\r\n", "crlf\r\n"),
    ],
)
def test_file_reference_trims_exactly_one_line_terminator(
    tmp_path: Path, contents: bytes, expected: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(contents)
    assert expand(f"${{file:{path}}}") == (expected, [])


def test_relative_file_resolves_against_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-credentials\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert expand("${file:key}", environ) == ("from-credentials", [])


def test_relative_file_without_credentials_directory_is_an_error() -> None:
    _, errors = expand("${file:key}")
    assert len(errors) == 1
    assert "CREDENTIALS_DIRECTORY" in errors[0]


def test_cred_reads_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "llmhop.token").write_text("t0k\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert expand("${cred:llmhop.token}", environ) == ("t0k", [])


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_cred_name_must_be_one_path_element(name: str, tmp_path: Path) -> None:
    _, errors = expand(f"${{cred:{name}}}", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert len(errors) == 1
    assert "credential name" in errors[0]


def test_cred_without_credentials_directory_is_an_error() -> None:
    _, errors = expand("${cred:x}", {"CREDENTIALS_DIRECTORY": ""})
    assert errors == ["${cred:x}: cred:x needs $CREDENTIALS_DIRECTORY, which is not set"]


def test_missing_file_error_names_the_path_not_contents(tmp_path: Path) -> None:
    _, errors = expand(f"${{file:{tmp_path}/nope}}")
    assert errors == [
        f"${{file:{tmp_path}/nope}}: cannot read {tmp_path}/nope: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$$", "$"),
        ("$${env:X}", "${env:X}"),
        ("a $ b $", "a $ b $"),
        ("price: 5$", "price: 5$"),
        ("no references", "no references"),
    ],
)
def test_literal_dollars(value: str, expected: str) -> None:
    assert expand(value) == (expected, [])


@pytest.mark.parametrize("value", ["$NAME", "${NAME}", "$1", "$*", "${}", "x${env}y"])
def test_references_without_a_scheme_are_rejected_with_a_hint(value: str) -> None:
    _, errors = expand(value)
    assert len(errors) == 1
    assert "is not a cred:, env: or file: reference; write $$ for a literal $" in errors[0]


def test_unclosed_reference_is_rejected() -> None:
    _, errors = expand("Bearer ${env:KEY")
    assert errors == ["unclosed reference '${env:KEY'"]


def test_every_error_is_reported() -> None:
    _, errors = expand("${env:A} $B ${cred:c} ${env:D}", {"CREDENTIALS_DIRECTORY": ""})
    assert len(errors) == 4


def test_check_only_reads_nothing_but_checks_syntax() -> None:
    resolver_kwargs = {"check_only": True}
    assert expand("${env:UNSET} ${file:/does/not/exist} ${cred:x}", **resolver_kwargs)[1] == []
    assert expand("${cred:a/b}", **resolver_kwargs)[1] != []
    assert expand("$BARE", **resolver_kwargs)[1] != []
