"""Figures, their ratios, the performance targets, and how they are printed and written down."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("direct", "nginx", "llmhop")
# Between these markers docs/benchmarks.md is rewritten by each run; the rest is kept.
BEGIN_MARKER = "<!-- BEGIN bench/run results: generated, do not edit by hand -->"
END_MARKER = "<!-- END bench/run results -->"


@dataclass
class Figure:
    """One measured quantity for each target (None where it does not apply)."""

    section: str
    name: str
    unit: str
    values: dict[str, float | None]
    digits: int = 1

    def value(self, target: str) -> float | None:
        return self.values.get(target)

    def ratio(self, target: str, reference: str) -> float | None:
        numerator, denominator = self.value(target), self.value(reference)
        if numerator is None or not denominator or math.isnan(numerator):
            return None
        return numerator / denominator

    def formatted(self, target: str) -> str:
        value = self.value(target)
        if value is None or math.isnan(value):
            return "—"
        return f"{value:,.{self.digits}f}"


@dataclass
class Target:
    """A performance target and whether this run met it (None: not measured)."""

    goal: str
    measured: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        section: str,
        name: str,
        unit: str,
        values: dict[str, float | None],
        digits: int = 1,
    ) -> Figure:
        figure = Figure(section, name, unit, values, digits)
        self.figures.append(figure)
        return figure

    def find(self, section: str, name: str) -> Figure | None:
        return next(
            (f for f in self.figures if f.section == section and f.name == name),
            None,
        )


def _ratio_text(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


TABLE_HEADER = (
    "figure",
    "unit",
    "direct",
    "nginx",
    "llmhop",
    "nginx ÷ direct",
    "llmhop ÷ direct",
    "llmhop ÷ nginx",
)


def table_rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [
        (
            figure.name,
            figure.unit,
            *(figure.formatted(target) for target in TARGETS),
            _ratio_text(figure.ratio("nginx", "direct")),
            _ratio_text(figure.ratio("llmhop", "direct")),
            _ratio_text(figure.ratio("llmhop", "nginx")),
        )
        for figure in figures
    ]


def sections(figures: list[Figure]) -> dict[str, list[Figure]]:
    grouped: dict[str, list[Figure]] = {}
    for figure in figures:
        grouped.setdefault(figure.section, []).append(figure)
    return grouped


def text_table(results: Results) -> str:
    """For the terminal: aligned columns, one block per section."""
    blocks = []
    for section, figures in sections(results.figures).items():
        rows = [TABLE_HEADER, *table_rows(figures)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
        lines = [f"== {section}"]
        for row in rows:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells))
        blocks.append("\n".join(lines))
    target_lines = ["== performance targets"]
    target_lines += [f"[{t.verdict.strip('*')}] {t.goal}: {t.measured}" for t in results.targets]
    return "\n\n".join([*blocks, "\n".join(target_lines)])


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    separator = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def markdown(results: Results, machine: list[tuple[str, str]], setup: list[str]) -> str:
    """The generated part of docs/benchmarks.md."""
    parts = ["## Latest results", "", _markdown_table(("", ""), machine), ""]
    parts += ["### Setup", "", *(f"- {line}" for line in setup), ""]
    if results.notes:
        parts += ["### Notes on this run", "", *(f"- {note}" for note in results.notes), ""]
    parts += ["### Performance targets", ""]
    target_rows = [(t.goal, t.measured, t.verdict) for t in results.targets]
    parts += [_markdown_table(("target", "measured", "verdict"), target_rows), ""]
    for section, figures in sections(results.figures).items():
        parts += [f"### {section}", "", _markdown_table(TABLE_HEADER, table_rows(figures)), ""]
    return "\n".join(parts).rstrip() + "\n"


DOCUMENT_HEAD = """\
# Benchmarks

`bench/run` measures the router against a direct connection and against nginx as a reverse
proxy, in one run, and rewrites the part of this file between the markers below. Everything
else here is written by hand.

"""


def write_document(path: Path, generated: str) -> None:
    """Replace the generated block of the document, keeping what is written around it."""
    block = f"{BEGIN_MARKER}\n\n{generated}\n{END_MARKER}"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(BEGIN_MARKER) + ".*?" + re.escape(END_MARKER), re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: block, text, count=1))
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOCUMENT_HEAD + block + "\n")
