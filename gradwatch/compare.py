"""``gradwatch report A.jsonl B.jsonl``: two recorded runs side by side ("before and after
my fix" in one command).

Prints which findings only A has, only B has, and both have (by rule, with the first
step and the layers of each); each layer's gradient RMS in A and in B at the monitored
steps both runs measured, with B/A; and the layers whose gradient changed most between
the runs. ``--png`` draws each run's heatmap and per-layer norms, side by side.

>>> import gradwatch.cli
>>> gradwatch.cli.main(["report", "before.jsonl", "after.jsonl"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from .demo.figure import save_figure, write_error
from .demo.table import Cell, print_table
from .report import (
    _layers,
    _say,
    _severity,
    gradient_layers,
    load_for_command,
    log_range,
    report_figure,
    sample_indices,
    sparkline,
    summary_rows,
    value_text,
)
from .reporters.jsonl import Record
from .rules.engine import SummaryRow

#: Layers listed under "changed most".
CHANGED_MOST = 5


@dataclass(frozen=True)
class FindingSplit:
    """Rule codes found only in A, only in B, and in both (first-seen order)."""

    only_a: list[str]
    only_b: list[str]
    both: list[str]


def split_findings(a: Record, b: Record) -> FindingSplit:
    """Which rules found something in one run and not the other.

    >>> from gradwatch.rules.engine import SummaryRow
    >>> row = lambda code: SummaryRow(code, "r", "warning", ("0",), 1, 1, "active")
    >>> split_findings(Record(summary=[row("GW101"), row("GW201")]), Record(summary=[row("GW201")]))
    FindingSplit(only_a=['GW101'], only_b=[], both=['GW201'])
    """
    codes_a = list(dict.fromkeys(row.code for row in summary_rows(a)))
    codes_b = list(dict.fromkeys(row.code for row in summary_rows(b)))
    return FindingSplit(
        only_a=[c for c in codes_a if c not in codes_b],
        only_b=[c for c in codes_b if c not in codes_a],
        both=[c for c in codes_a if c in codes_b],
    )


def matching_steps(a: Record, b: Record) -> list[int]:
    """The monitored steps both runs measured, in order."""
    in_b = {s.step for s in b.steps}
    return [s.step for s in a.steps if s.step in in_b]


@dataclass(frozen=True)
class LayerChange:
    """One layer's gradient RMS in both runs at the matching steps."""

    name: str
    a: list[float | None]
    b: list[float | None]

    @property
    def log_change(self) -> float | None:
        """Mean log10(B/A) over the steps where both are positive and finite; +-inf when
        one run's gradient is exactly 0 throughout and the other's is not."""
        logs = [
            math.log10(y / x)
            for x, y in zip(self.a, self.b)
            if x and y and math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0
        ]
        if logs:
            return sum(logs) / len(logs)
        zero_a = any(x == 0 for x in self.a) and any(y and y > 0 for y in self.b)
        zero_b = any(y == 0 for y in self.b) and any(x and x > 0 for x in self.a)
        return math.inf if zero_a else -math.inf if zero_b else None

    @property
    def factor_text(self) -> str:
        """B/A as text: "x2.0e+03", "0 -> >0", "-"."""
        change = self.log_change
        if change is None:
            return "-"
        if math.isinf(change):
            return "0 in A" if change > 0 else "0 in B"
        return f"x{10**change:.2g}"


def layer_changes(a: Record, b: Record, steps: Sequence[int]) -> list[LayerChange]:
    """The layers both runs measured, input side first (A's order), at ``steps``."""
    names_b = set(gradient_layers(b))
    by_step_a = {s.step: s for s in a.steps}
    by_step_b = {s.step: s for s in b.steps}
    changes = []
    for name in gradient_layers(a):
        if name not in names_b:
            continue
        changes.append(
            LayerChange(
                name,
                [_rms(by_step_a[step], name) for step in steps],
                [_rms(by_step_b[step], name) for step in steps],
            )
        )
    return changes


def changed_most(changes: Sequence[LayerChange], n: int = CHANGED_MOST) -> list[LayerChange]:
    """The ``n`` layers whose gradient RMS moved furthest (on a log scale) from A to B."""
    known = [c for c in changes if c.log_change is not None]
    return sorted(known, key=lambda c: -abs(c.log_change or 0.0))[:n]


def _rms(stats: Any, name: str) -> float | None:
    layer = stats.layers.get(name)
    value = getattr(layer, "grad_rms", None) if layer is not None else None
    return float(value) if value is not None else None


# -- text ---------------------------------------------------------------------------------


def print_comparison(
    a: Record, b: Record, paths: tuple[str, str], console: Console
) -> list[LayerChange]:
    """Header, findings each way, per-layer gradients at matching steps, biggest changes."""
    _say(console, "gradwatch report: two runs", style="bold")
    for label, record, path in (("A", a, paths[0]), ("B", b, paths[1])):
        model = record.meta.get("model")
        span = f"steps {record.steps[0].step}..{record.steps[-1].step}" if record.steps else "none"
        _say(
            console,
            f"  {label}: {path}" + (f" ({model})" if model else "")
            + f", {len(record.steps)} monitored step(s) ({span}), "
            f"{len(summary_rows(record))} problem(s)",
        )
    console.print()
    _print_findings(console, a, b)
    console.print()
    steps = matching_steps(a, b)
    if not steps:
        _say(
            console,
            "no monitored step in common (different --every?): gradients are not compared",
            style="yellow",
        )
        return []
    changes = layer_changes(a, b, steps)
    _print_layers(console, changes, steps)
    console.print()
    _print_changed_most(console, changes)
    only_a = [n for n in gradient_layers(a) if n not in {c.name for c in changes}]
    only_b = [n for n in gradient_layers(b) if n not in {c.name for c in changes}]
    for label, names in (("A", only_a), ("B", only_b)):
        if names:
            _say(console, f"layers only in {label}: {_layers(names, 8)}")
    return changes


def _print_findings(console: Console, a: Record, b: Record) -> None:
    split = split_findings(a, b)
    rows_a = _first_rows(summary_rows(a))
    rows_b = _first_rows(summary_rows(b))
    if not (split.only_a or split.only_b or split.both):
        _say(console, "findings: none in either run", style="green")
        return
    cells: list[list[Cell]] = []
    for where, codes in (("only A", split.only_a), ("only B", split.only_b), ("both", split.both)):
        for code in codes:
            row = rows_a.get(code) or rows_b[code]
            cells.append(
                [
                    f"{code} {row.rule}",
                    where,
                    _severity(row.severity),
                    _side(rows_a.get(code)),
                    _side(rows_b.get(code)),
                ]
            )
    print_table(
        console,
        "findings in each run",
        ["rule", "found in", "severity", "A: first step, layers", "B: first step, layers"],
        cells,
        keep_whole=("rule", "found in"),
    )


def _first_rows(rows: Sequence[SummaryRow]) -> dict[str, SummaryRow]:
    first: dict[str, SummaryRow] = {}
    for row in rows:
        first.setdefault(row.code, row)
    return first


def _side(row: SummaryRow | None) -> str:
    if row is None:
        return "-"
    status = "" if row.status == "active" else f" (resolved at {row.resolved_step})"
    return f"step {row.first_step}: {_layers(row.layers, 3)}{status}"


def _print_layers(console: Console, changes: Sequence[LayerChange], steps: Sequence[int]) -> None:
    last = steps[-1]
    scale = log_range([values for c in changes for values in (c.a, c.b)])
    shown = sample_indices(len(steps), 24)
    cells: list[list[Cell]] = []
    for change in changes:
        cells.append(
            [
                change.name or "<root>",
                value_text(change.a[-1]),
                value_text(change.b[-1]),
                change.factor_text,
                sparkline([change.a[i] for i in shown], plain=not console.is_terminal, scale=scale),
                sparkline([change.b[i] for i in shown], plain=not console.is_terminal, scale=scale),
            ]
        )
    low, high = scale
    print_table(
        console,
        f"gradient RMS per layer (input side first) at the {len(steps)} monitored step(s) "
        "both runs measured",
        ["layer", f"A @{last}", f"B @{last}", "B/A", "A over time", "B over time"],
        cells,
        right=(f"A @{last}", f"B @{last}", "B/A"),
        keep_whole=("layer", "A over time", "B over time"),
        caption=f"B/A: geometric mean over the matching steps; over time: one log scale for "
        f"both runs (1e{low:.0f} to 1e{high:.0f}); blank = exactly 0, '-' = not measured",
    )


def _print_changed_most(console: Console, changes: Sequence[LayerChange]) -> None:
    most = changed_most(changes)
    if not most:
        return
    parts = [f"{c.name or '<root>'} {c.factor_text}" for c in most]
    _say(console, "changed most from A to B: " + ", ".join(parts), style="bold")


# -- figure -------------------------------------------------------------------------------


def compare_figure(a: Record, b: Record, labels: tuple[str, str]) -> Any:
    """Each run's report figure (heatmap and per-layer norms), side by side."""
    from .demo.extras import figure_class

    figure = figure_class()(figsize=(20, 8), layout="constrained")
    for panel, record, label in zip(figure.subfigures(1, 2), (a, b), labels):
        named = dataclasses.replace(record, meta={**record.meta, "model": label})
        report_figure(named, figure=panel)
    return figure


# -- command ------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``gradwatch report A.jsonl B.jsonl [--png FILE]`` (wired in :mod:`gradwatch.report`)."""
    paths = (args.record, args.other)
    png = getattr(args, "png", None)
    if getattr(args, "json", False):
        print("gradwatch report: --json reads one record at a time", file=sys.stderr)
        return 2
    records = load_for_command(paths, png)
    if records is None:
        return 2
    a, b = records
    print_comparison(a, b, paths, Console())
    if png is not None:
        names = tuple(
            f"{label}: {os.path.basename(path)}" for label, path in zip("AB", paths)
        )
        try:
            save_figure(compare_figure(a, b, names), png)  # type: ignore[arg-type]
        except OSError as error:
            print(f"gradwatch report: {write_error(error)}", file=sys.stderr)
            return 2
        print(f"figure: {png}")
    return 0


__all__ = [
    "FindingSplit",
    "LayerChange",
    "changed_most",
    "compare_figure",
    "layer_changes",
    "matching_steps",
    "print_comparison",
    "split_findings",
]
