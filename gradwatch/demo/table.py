"""Tables for the demo and the report: rich in a terminal, plain aligned text elsewhere
(a file, a pipe, CI logs), so the output stays readable and greppable."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..reporters.terminal import SEVERITY_STYLE

if TYPE_CHECKING:  # run.py trains with torch; the tables (shared with the report) do not
    from .run import NetRun

Cell = str | Text


def print_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: Sequence[str] = (),
    caption: str | None = None,
    keep_whole: Sequence[str] = (),
    fit_plain: bool = True,
) -> None:
    """Print a table; ``right`` names the columns to right-align (numbers), ``keep_whole``
    the columns never wrapped or shortened (names to copy). In a terminal the other
    columns wrap to its width; in plain text too unless ``fit_plain`` is False (a table
    whose lines logs should keep whole)."""
    if console.is_terminal:
        table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        for index, column in enumerate(columns):
            whole = column in keep_whole
            widest = max([len(column), *(_length(row[index]) for row in rows)])
            table.add_column(
                column,
                justify="right" if column in right else "left",
                no_wrap=whole,
                min_width=widest if whole else None,
            )
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    wrap = [c for c in columns if c not in right and c not in keep_whole]
    width = console.width if fit_plain else None
    text = plain_table(title, columns, rows, right=right, caption=caption, width=width, wrap=wrap)
    console.print(
        text,
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _length(cell: Cell) -> int:
    return len(cell.plain if isinstance(cell, Text) else cell)


def plain_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: Sequence[str] = (),
    caption: str | None = None,
    width: int | None = None,
    wrap: Sequence[str] = (),
) -> str:
    """The table as text: a title, a header, a rule and one line per row.

    With ``width``, the ``wrap`` columns (the widest first) are narrowed until the table
    fits, their cells wrapped onto continuation lines; the title and caption wrap at
    words. Numbers and names are never cut: if they alone are wider, so is the table.

    >>> print(plain_table("t", ["a", "n"], [["x", "1"], ["yy", "10"]], right=["n"]))
    t
    a    n
    --  --
    x    1
    yy  10
    >>> note = "one two three four five six"
    >>> print(plain_table("t", ["n", "note"], [["1", note]], width=20, wrap=["note"]))
    t
    n  note
    -  -----------------
    1  one two three
       four five six
    """
    cells = [[c.plain if isinstance(c, Text) else str(c) for c in row] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    if width is not None:
        _narrow(widths, columns, wrap, width)

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if col in right else v.ljust(w) for v, w, col in zip(values, widths, columns)
        ]
        return "  ".join(parts).rstrip()

    out = _wrapped(title, width)
    out += [line(columns), line(["-" * w for w in widths])]
    for row in cells:
        pieces = [
            _cell_lines(v, w) if col in wrap else [v] for v, w, col in zip(row, widths, columns)
        ]
        for k in range(max(len(p) for p in pieces)):
            out.append(line([p[k] if k < len(p) else "" for p in pieces]))
    if caption:
        out += _wrapped(caption, width)
    return "\n".join(out)


#: A wrapped column keeps at least this many characters.
MIN_WRAP_WIDTH = 12


def _narrow(widths: list[int], columns: Sequence[str], wrap: Sequence[str], width: int) -> None:
    """Shrink the widest wrappable column, one character at a time, until the table fits."""
    wrappable = [i for i, col in enumerate(columns) if col in wrap]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        candidates = [i for i in wrappable if widths[i] > MIN_WRAP_WIDTH]
        if not candidates:
            return
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1


def _cell_lines(value: str, width: int) -> list[str]:
    if len(value) <= width:
        return [value]
    return textwrap.wrap(value, width, break_on_hyphens=False) or [""]


def _wrapped(text: str, width: int | None) -> list[str]:
    return textwrap.wrap(text, width) if width is not None and len(text) > width else [text]


def ratio_text(ratio: float | None, layer_rms: Sequence[tuple[str, float]] = ()) -> str:
    """A first/last gradient ratio: "0" when the first layer gets exactly nothing."""
    if ratio is None:
        if layer_rms and layer_rms[-1][1] == 0:
            return "0/0"
        return "n/a"
    if ratio == 0:
        return "0"
    return f"{ratio:.1e}"


def findings_cell(run: NetRun) -> Text:
    rows = sorted(run.problem_rows, key=lambda row: row.code)
    if not rows:
        return Text("none", style="green")
    text = Text()
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if (row.code, row.severity) in seen:
            continue
        seen.add((row.code, row.severity))
        if text:
            text.append(", ")
        label = f"{row.code} {row.severity}"
        if row.status == "resolved":
            label += " (resolved)"
        text.append(label, style=SEVERITY_STYLE.get(row.severity, ""))
    return text


RESULT_COLUMNS = ("model", "layers", "first/last grad RMS", "findings", "final loss", "accuracy")


def result_rows(runs: Sequence[NetRun]) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for run in runs:
        loss = f"{run.final_loss:.3f}" if math.isfinite(run.final_loss) else str(run.final_loss)
        rows.append(
            [
                run.net.name,
                str(run.depth),
                ratio_text(run.first_last_ratio, run.layer_rms),
                findings_cell(run),
                loss,
                f"{100 * run.accuracy:.1f}%",
            ]
        )
    return rows


RESULT_RIGHT = ("layers", "first/last grad RMS", "final loss", "accuracy")
RESULT_CAPTION = (
    "first/last grad RMS: first weight layer's gradient RMS over the last one's, "
    "at the last monitored step. findings: warnings and errors gradwatch reported."
)


def results_title(runs: Sequence[NetRun]) -> str:
    steps = runs[0].steps if runs else 0
    return f"gradwatch demo: {steps} steps each, digits (held-out accuracy)"


def results_text(runs: Sequence[NetRun]) -> str:
    """The results table as plain text (what a log or a pipe gets), without the caption."""
    return plain_table(results_title(runs), RESULT_COLUMNS, result_rows(runs), right=RESULT_RIGHT)


def print_results(console: Console, runs: Sequence[NetRun]) -> None:
    """The side-by-side results table."""
    print_table(
        console,
        results_title(runs),
        RESULT_COLUMNS,
        result_rows(runs),
        right=RESULT_RIGHT,
        keep_whole=("model",),
        caption=RESULT_CAPTION,
        fit_plain=False,  # logs keep one line per network, as the README shows it
    )
