"""docs/module.md's option reference is what the module declares: every option, type, default
and description (tests/nix/option_docs.py renders the tables from the evaluated options)."""

from __future__ import annotations

import copy
from typing import Any

import option_docs
import pytest
from nix_harness import option_docs as evaluated_option_docs

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return evaluated_option_docs()


def test_module_md_shows_every_option_as_declared(docs: list[dict[str, Any]]) -> None:
    diff = option_docs.stale(option_docs.MODULE_MD.read_text(), docs)
    assert not diff, (
        "docs/module.md differs from the options; run `python3 tests/nix/option_docs.py`:\n" + diff
    )


def test_every_documented_option_has_a_row(docs: list[dict[str, Any]]) -> None:
    text = option_docs.MODULE_MD.read_text()
    for doc in docs:
        option = doc["name"].removeprefix(option_docs.PREFIX)
        for prefix in (option_docs.GATEWAY, *(f"{b}." for b in option_docs.BACKENDS)):
            if option.startswith(prefix):
                option = option.removeprefix(prefix)
                break
        assert f"| `{option}` |" in text, doc["name"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("default", {"_type": "literalExpression", "text": "8081"}),
        ("type", "string"),
        ("name", "services.llmhop.listenPort"),
    ],
)
def test_a_changed_option_makes_the_docs_stale(
    docs: list[dict[str, Any]], field: str, value: Any
) -> None:
    current = option_docs.update(option_docs.MODULE_MD.read_text(), option_docs.render(docs))
    changed = copy.deepcopy(docs)
    port = next(d for d in changed if d["name"] == "services.llmhop.port")
    port[field] = value
    diff = option_docs.stale(current, changed)
    changed_lines = [line for line in diff.splitlines() if line[:2] in ("-|", "+|")]
    assert changed_lines, diff
    assert all("ort` |" in line for line in changed_lines), changed_lines
