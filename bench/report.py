"""Figures, their ratios, the performance targets, and how they are printed and written down."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

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


# -- the plot ----------------------------------------------------------------------------------

COLOURS = {"direct": "#9e9e9e", "nginx": "#2e7d32", "llmhop": "#1565c0"}
PLOTTED = (
    ("proxy CPU per request", None, "Proxy CPU per request (µs)"),
    ("latency p50", "added latency p50", "Latency p50 (µs; added over direct in brackets)"),
)


def svg_plot(results: Results, plotted_sections: list[str]) -> str | None:
    """Bars of CPU per request and latency, llmhop beside nginx and direct, one group of bars
    per section (concurrency): an SVG document, written with the standard library alone.
    None when the run measured none of the sections."""
    groups = [s for s in plotted_sections if results.find(s, PLOTTED[0][0]) is not None]
    if not groups:
        return None
    bar, gap, group_gap, panel_height, top = 26, 4, 30, 190, 56
    group_width = len(TARGETS) * (bar + gap) - gap
    panel_width = 70 + len(groups) * (group_width + group_gap)
    width = panel_width * len(PLOTTED) + 20
    height = top + panel_height + 70
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for index, target in enumerate(TARGETS):
        x = 20 + index * 110
        parts.append(f'<rect x="{x}" y="12" width="12" height="12" fill="{COLOURS[target]}"/>')
        parts.append(f'<text x="{x + 18}" y="22">{escape(target)}</text>')
    for panel, (name, added_name, title) in enumerate(PLOTTED):
        left = 20 + panel * panel_width
        base = top + panel_height
        figures = [results.find(section, name) for section in groups]
        values = [
            f.value(t) for f in figures if f is not None for t in TARGETS if f.value(t) is not None
        ]
        scale = (panel_height - 70) / max([v for v in values if not math.isnan(v)] or [1.0])
        parts.append(f'<text x="{left}" y="{top - 10}" font-weight="bold">{escape(title)}</text>')
        parts.append(
            f'<line x1="{left}" y1="{base}" x2="{left + panel_width - 40}" y2="{base}" '
            'stroke="black"/>'
        )
        for column, (section, figure) in enumerate(zip(groups, figures, strict=True)):
            x0 = left + 10 + column * (group_width + group_gap)
            added = results.find(section, added_name) if added_name else None
            for index, target in enumerate(TARGETS):
                x = x0 + index * (bar + gap)
                value = figure.value(target) if figure is not None else None
                if value is None or math.isnan(value):
                    label, bar_height = "no proxy" if target == "direct" else "—", 0.0
                else:
                    label, bar_height = figure.formatted(target), value * scale
                    if added is not None and added.value(target) is not None:
                        label += f" (+{added.formatted(target)})"
                parts.append(
                    f'<rect x="{x}" y="{base - bar_height:.1f}" width="{bar}" '
                    f'height="{bar_height:.1f}" fill="{COLOURS[target]}">'
                    f"<title>{escape(f'{section}, {target}: {label}')}</title></rect>"
                )
                ty = base - bar_height - 4
                parts.append(
                    f'<text x="{x + bar / 2}" y="{ty:.1f}" font-size="9" text-anchor="start" '
                    f'transform="rotate(-60 {x + bar / 2} {ty:.1f})">{escape(label)}</text>'
                )
            caption = section.rsplit(", ", 1)[-1]
            parts.append(
                f'<text x="{x0 + group_width / 2}" y="{base + 16}" '
                f'text-anchor="middle">{escape(caption)}</text>'
            )
        parts.append(
            f'<text x="{left + (panel_width - 40) / 2}" y="{base + 34}" text-anchor="middle">'
            f"{escape(groups[0].rsplit(', ', 1)[0])}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
