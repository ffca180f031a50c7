"""Tables for the demo and the report: rich in a terminal, plain aligned text elsewhere
(a file, a pipe, CI logs), so the output stays readable and greppable."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..reporters.terminal import SEVERITY_STYLE
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
) -> None:
    """Print a table; ``right`` names the columns to right-align (numbers), ``keep_whole``
    the columns never wrapped or shortened in a narrow terminal (names to copy)."""
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
    console.print(
        plain_table(title, columns, rows, right=right, caption=caption),
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
) -> str:
    """The table as text: a title, a header, a rule and one line per row.

    >>> print(plain_table("t", ["a", "n"], [["x", "1"], ["yy", "10"]], right=["n"]))
    t
    a    n
    --  --
    x    1
    yy  10
    """
    cells = [[c.plain if isinstance(c, Text) else str(c) for c in row] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if col in right else v.ljust(w) for v, w, col in zip(values, widths, columns)
        ]
        return "  ".join(parts).rstrip()

    out = [title, line(columns), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    if caption:
        out.append(caption)
    return "\n".join(out)


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


def print_results(console: Console, runs: Sequence[NetRun]) -> None:
    """The side-by-side results table."""
    steps = runs[0].steps if runs else 0
    print_table(
        console,
        f"gradwatch demo: {steps} steps each, digits (held-out accuracy)",
        RESULT_COLUMNS,
        result_rows(runs),
        right=("layers", "first/last grad RMS", "final loss", "accuracy"),
        keep_whole=("model",),
        caption=(
            "first/last grad RMS: first weight layer's gradient RMS over the last one's, "
            "at the last monitored step. findings: warnings and errors gradwatch reported."
        ),
    )
