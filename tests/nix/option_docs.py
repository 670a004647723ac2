"""The option reference of docs/module.md, generated from the evaluated options.

The module's documented options (nixpkgs' `lib.optionAttrSetToDocList` over
`services.llmhop`, read through the harness: nix_harness.option_docs) become markdown tables
between markers in docs/module.md:

    <!-- options: router -->   ...   <!-- end of options: router -->

`router` holds services.llmhop.* but the backends, `backends` every backend's options (a row
per option, shared by the backends whose type, default and description agree once their
name reads `<backend>`), `gateway` services.llmhop.sglang.gateway.*.

    python3 tests/nix/option_docs.py           # rewrite docs/module.md
    python3 tests/nix/option_docs.py --check   # exit 1, with a diff, if it is out of date

tests/nix/test_nix_option_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULE_MD = HERE.parents[1] / "docs" / "module.md"

PREFIX = "services.llmhop."
BACKENDS = {"llama-cpp": "llama.cpp", "vllm": "vLLM", "sglang": "SGLang"}
GATEWAY = "sglang.gateway."
SECTIONS = ("router", "backends", "gateway")

# nixpkgs' markdown roles ({file}`x`, {command}`x`, …) as plain inline code.
ROLE = re.compile(r"\{(?:file|command|env|option|manpage|var)\}`")

Doc = dict[str, Any]


def _inline(text: str) -> str:
    """One table cell: roles dropped, lines joined, pipes escaped."""
    text = ROLE.sub("`", text)
    return " ".join(text.split()).replace("|", "\\|")


def _default(doc: Doc) -> str:
    default = doc.get("default")
    if default is None:
        return "*required*"
    text = default["text"]
    if default.get("_type") == "literalMD":
        return _inline(text)
    return f"`{' '.join(text.split())}`".replace("|", "\\|")


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [_row(header), _row("---" for _ in header)]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def _cells(doc: Doc) -> tuple[str, str, str]:
    return (_inline(doc["type"]), _default(doc), _inline(doc.get("description") or ""))


def _generic(text: str, backend: str) -> str:
    """A backend's text with its name (and display name) written `<backend>`."""
    text = text.replace(f"services.llmhop.{backend}", "services.llmhop.<backend>")
    text = re.sub(rf"(?<![\w.-]){re.escape(backend)}(?![\w])", "<backend>", text)
    return text.replace(BACKENDS[backend], "<backend>")


def render(docs: list[Doc]) -> dict[str, str]:
    """The markdown table of each section."""
    router: list[list[str]] = []
    gateway: list[list[str]] = []
    # option (below the backend) -> cells with the backend's name generic -> backend -> cells
    shared: dict[str, dict[tuple[str, ...], dict[str, tuple[str, ...]]]] = {}
    for doc in sorted(docs, key=lambda d: d["name"]):
        name = doc["name"].removeprefix(PREFIX)
        backend = name.split(".", 1)[0]
        if name.startswith(GATEWAY):
            gateway.append([f"`{name.removeprefix(GATEWAY)}`", *_cells(doc)])
        elif backend in BACKENDS:
            option = name.removeprefix(f"{backend}.")
            cells = _cells(doc)
            generic = tuple(_generic(cell, backend) for cell in cells)
            shared.setdefault(option, {}).setdefault(generic, {})[backend] = cells
        else:
            router.append([f"`{name}`", *_cells(doc)])
    backends: list[list[str]] = []
    for option, variants in shared.items():
        for generic, by_backend in variants.items():
            # A backend's own row keeps its name: `<backend>` is for what backends share.
            if len(by_backend) == 1:
                [(backend, cells)] = by_backend.items()
                backends.append([f"`{option}`", backend, *cells])
                continue
            which = "all" if len(by_backend) == len(BACKENDS) else ", ".join(by_backend)
            backends.append([f"`{option}`", which, *generic])
    header = ["option", "type", "default", "description"]
    return {
        "router": _table(header, router),
        "backends": _table([header[0], "backends", *header[1:]], backends),
        "gateway": _table(header, gateway),
    }


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- options: {section} -->", f"<!-- end of options: {section} -->"


def update(text: str, tables: dict[str, str]) -> str:
    """`text` with every section's table replaced by the rendered one."""
    for section in SECTIONS:
        start, end = _markers(section)
        found = re.search(rf"{re.escape(start)}\n.*?{re.escape(end)}", text, re.DOTALL)
        if found is None:
            raise ValueError(f"docs/module.md has no {start} … {end} block")
        block = f"{start}\n{tables[section]}\n{end}"
        text = text[: found.start()] + block + text[found.end() :]
    return text


def stale(text: str, docs: list[Doc]) -> str:
    """A diff from `text` to what the options say it should be; empty when it is current."""
    wanted = update(text, render(docs))
    return "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            wanted.splitlines(keepends=True),
            "docs/module.md",
            "docs/module.md as the options say",
        )
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    options = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from nix_harness import option_docs

    docs = option_docs()
    text = MODULE_MD.read_text()
    if options.check:
        diff = stale(text, docs)
        sys.stdout.write(diff)
        return 1 if diff else 0
    MODULE_MD.write_text(update(text, render(docs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
