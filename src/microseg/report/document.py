"""A small document built once and rendered twice, as HTML and as Markdown.

The benchmark report ships both (HTML to open, Markdown for PRs and the CLI) with the same
content, so tables and sections are described once (:class:`Doc`, :class:`Table`) and each
renders itself; values are formatted here so both renderings show the same text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float | np.floating) and not math.isfinite(value))


def format_number(value: object, digits: int = 3) -> str:
    if is_missing(value):
        return "—"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def fmt_seconds(seconds: float | None) -> str:
    if is_missing(seconds):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


def fmt_params(n: int | None) -> str:
    if is_missing(n):
        return "—"
    n = int(n)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def best_value(values: Sequence[object], higher: bool) -> float | None:
    nums = [float(v) for v in values if not is_missing(v)]
    if len(nums) < 2:
        return None
    return max(nums) if higher else min(nums)


@dataclass
class Table:
    """A table as header + rows of cells; a cell is (text, link or None, bold)."""

    header: list[str]
    rows: list[list[tuple[str, str | None, bool]]]
    row_class: list[str]

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = []
        for cells, cls in zip(self.rows, self.row_class, strict=True):
            tds = []
            for text, link, bold in cells:
                t = html.escape(text)
                if link:
                    t = f'<a href="{html.escape(link, quote=True)}">{t}</a>'
                if bold:
                    t = f"<strong>{t}</strong>"
                tds.append(f"<td>{t}</td>")
            attr = f' class="{cls}"' if cls else ""
            body.append(f"<tr{attr}>{''.join(tds)}</tr>")
        return (
            f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body)
            + ("\n</tbody>\n</table>")
        )

    def markdown(self) -> str:
        def cell(text: str, link: str | None, bold: bool) -> str:
            t = text.replace("|", "\\|")
            if link:
                t = f"[{t}]({link})"
            return f"**{t}**" if bold else t

        lines = [
            "| " + " | ".join(h.replace("|", "\\|") for h in self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        lines += ["| " + " | ".join(cell(*c) for c in cells) + " |" for cells in self.rows]
        return "\n".join(lines)


CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 2em; color: #222; max-width: 80em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.baseline td { background: #fff6d6; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 36em; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 36em; overflow-wrap: anywhere; }
dl.context dt { font-weight: bold; float: left; clear: left; margin-right: 0.5em; }
.legend { font-size: 0.85em; color: #444; }
code { font-size: 0.9em; }
""".strip()


@dataclass
class Doc:
    """The report built up once, rendered as HTML and as Markdown."""

    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def para(self, text: str, cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def table(self, t: Table) -> None:
        self.html.append(t.html())
        self.md.append(t.markdown() + "\n")

    def figures(self, items: Sequence[tuple[str, str]]) -> None:
        """``(relative path, caption)`` figures side by side."""
        for path, caption in items:
            p, c = html.escape(path, quote=True), html.escape(caption)
            self.html.append(
                f'<figure><img src="{p}" alt="{c}"><figcaption>{c}</figcaption></figure>'
            )
            self.md.append(f"![{caption}]({path})\n")

    def links(self, items: Sequence[tuple[str, str]]) -> None:
        lis = "".join(
            f'<li><a href="{html.escape(h, quote=True)}">{html.escape(t)}</a></li>'
            for t, h in items
        )
        self.html.append(f"<ul>{lis}</ul>")
        self.md.append("\n".join(f"- [{t}]({h})" for t, h in items) + "\n")
