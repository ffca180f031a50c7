"""Findings in the terminal: a rich panel per finding with a gradient-flow chart, plain text
when the output is not a terminal, and a summary table at the end.

It shares the screen with progress bars instead of fighting them: while a tqdm bar is
open (Lightning's default) lines go through ``tqdm.write``; under a rich ``Live``
display (rich progress, Lightning's RichProgressBar) they go to ``sys.stderr``, which
Live redirects above its display.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..coverage import Coverage
from ..findings import Finding, severity_rank
from ..rules.engine import SummaryRow
from ..stats import StepStats
from ..wording import display_name
from .base import Reporter
from .chart import TERMINAL_ROWS, gradient_flow_table, gradient_flow_text

SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


def format_number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def evidence_text(finding: Finding) -> str:
    return ", ".join(f"{k}={format_number(v)}" for k, v in finding.evidence.items())


def layers_text(names: Sequence[str], limit: int = 12) -> str:
    """Module names for display, the root as ``<root>``, the rest counted."""
    shown = ", ".join(display_name(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


def finding_fields(finding: Finding, layer_limit: int | None = 12) -> list[tuple[str, str]]:
    """``(label, text)`` for a finding's layers, evidence and fix (those it has): the
    parts that every way of showing a finding shows."""
    fields = []
    if finding.layers:
        limit = len(finding.layers) if layer_limit is None else layer_limit
        fields.append(("layers", layers_text(finding.layers, limit)))
    if finding.evidence:
        fields.append(("evidence", evidence_text(finding)))
    if finding.hint:
        fields.append(("fix", finding.hint))
    return fields


def _row_status(row: SummaryRow) -> str:
    return "active" if row.status == "active" else f"resolved at {row.resolved_step}"


def finding_text(finding: Finding) -> str:
    """A finding as plain lines (no colour, no box drawing)."""
    head = (
        f"gradwatch {finding.severity.upper()} {finding.title} at step {finding.step}"
        + (f" [{finding.status}]" if finding.status != "new" else "")
    )
    lines = [head, f"  {finding.message}"]
    lines.extend(f"  {label}: {text}" for label, text in finding_fields(finding))
    return "\n".join(lines)


def finding_panel(
    finding: Finding,
    stats: StepStats | None = None,
    chart: bool = True,
    chart_rows: int | None = TERMINAL_ROWS,
) -> Panel:
    """A finding as a rich panel, with the gradient-flow chart below it (at most
    ``chart_rows`` telling rows of it; None: every layer)."""
    style = SEVERITY_STYLE.get(finding.severity, "white")
    body = Table.grid(padding=(0, 1))
    body.add_column(style="bold", no_wrap=True)
    body.add_column()
    body.add_row("what", Text(finding.message))
    styles = {"evidence": "dim", "fix": "green"}
    for label, text in finding_fields(finding):
        body.add_row(label, Text(text, style=styles.get(label, "")))
    parts: list[Any] = [body]
    if chart and stats is not None and stats.layers:
        parts.append(Text(""))
        parts.append(gradient_flow_table(stats, rows=chart_rows))
    status = "" if finding.status == "new" else f" ({finding.status})"
    return Panel(
        Group(*parts),
        title=Text(
            f"{finding.title} · {finding.severity}{status} · step {finding.step}", style=style
        ),
        title_align="left",
        border_style=style,
        expand=False,
    )


def summary_table(rows: Sequence[SummaryRow]) -> Table:
    table = Table(title="gradwatch summary", title_justify="left")
    for column in ("code", "rule", "severity", "layers", "first step", "status"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.code,
            row.rule,
            Text(row.severity, style=SEVERITY_STYLE.get(row.severity, "")),
            layers_text(row.layers, 4),
            str(row.first_step),
            _row_status(row),
        )
    return table


def summary_text(rows: Sequence[SummaryRow], coverage: Coverage | None = None) -> str:
    """The summary as plain text; with ``coverage``, what was measured.

    >>> summary_text([], Coverage(steps=180, measured=12, layers=20))
    'gradwatch summary: no findings in 12 measured steps of 180 (20 layers)'
    """
    if not rows:
        if coverage is None:
            return "gradwatch summary: no findings"
        if coverage.nothing_measured:
            return f"gradwatch summary: {coverage.describe()}"
        return f"gradwatch summary: no findings in {coverage.describe()}"
    lines = ["gradwatch summary:"]
    for row in rows:
        lines.append(
            f"  {row.code} {row.rule} [{row.severity}] first at step {row.first_step}, "
            f"{_row_status(row)}: {layers_text(row.layers, 4)}"
        )
    if coverage is not None:
        lines.append(f"  over {coverage.describe()}")
    return "\n".join(lines)


def _open_tqdm() -> Any | None:
    """tqdm's class when a tqdm bar is on screen now, else None."""
    module = sys.modules.get("tqdm")
    if module is None:
        return None
    tqdm_cls = getattr(module, "tqdm", None)
    instances = getattr(tqdm_cls, "_instances", None)
    return tqdm_cls if instances else None


class TerminalReporter(Reporter):
    """Prints findings as they start, and a summary at ``close()``.

    ``min_severity`` hides lesser findings (``"warning"`` hides the "resolved" notes);
    ``chart`` adds the gradient-flow chart under each new finding, sampled to
    ``chart_rows`` rows for a deep network (the first and last layers, both sides of the
    steepest drop, and layers evenly between; ``None`` draws every layer); ``file`` sends the
    output elsewhere (default: standard error); ``plain`` forces (True) or forbids
    (False) the plain-text form (default: plain unless the output is a terminal).

    >>> import io
    >>> out = io.StringIO()
    >>> reporter = TerminalReporter(file=out)
    >>> reporter.close([])
    >>> out.getvalue().strip()
    'gradwatch summary: no findings'
    """

    name = "terminal"

    def __init__(
        self,
        *,
        min_severity: str = "info",
        chart: bool = True,
        chart_rows: int | None = TERMINAL_ROWS,
        file: TextIO | None = None,
        plain: bool | None = None,
        summary: bool = True,
    ) -> None:
        severity_rank(min_severity)  # validates
        if chart_rows is not None and chart_rows < 2:
            raise ValueError(
                f"chart_rows must be at least 2 (the first and last layer) or None, "
                f"got {chart_rows}"
            )
        self.min_severity = min_severity
        self.chart = chart
        self.chart_rows = chart_rows
        self.file = file
        self.plain = plain
        self.summary = summary

    # Resolved lazily: a Live display or a progress bar may have replaced sys.stderr.
    def _target(self) -> TextIO:
        return self.file if self.file is not None else sys.stderr

    def _is_plain(self) -> bool:
        if self.plain is not None:
            return self.plain
        target = self._target()
        isatty = getattr(target, "isatty", None)
        try:
            return not (isatty is not None and isatty())
        except (ValueError, OSError):
            return True

    def _emit(self, renderable: Any, text: str) -> None:
        tqdm_cls = _open_tqdm() if self.file is None else None
        if self._is_plain():
            output = text
            if tqdm_cls is not None:
                tqdm_cls.write(output, file=sys.stderr)
            else:
                target = self._target()
                target.write(output + "\n")
                target.flush()
            return
        if tqdm_cls is not None:
            buffer = io.StringIO()
            Console(file=buffer, force_terminal=True, width=_width()).print(renderable)
            tqdm_cls.write(buffer.getvalue().rstrip("\n"), file=sys.stderr)
            return
        target = self._target()
        if getattr(target, "rich_proxied_file", None) is not None:
            # Under a rich Live display (rich progress, Lightning's RichProgressBar: its
            # default when rich is installed) sys.stderr is rich's FileProxy. A Console
            # given the proxy writes to the file beneath it and garbles the display; text
            # written to the proxy itself is printed above the display.
            buffer = io.StringIO()
            Console(file=buffer, force_terminal=True, width=_width()).print(renderable)
            target.write(buffer.getvalue())
            target.flush()
            return
        Console(file=target, width=_width()).print(renderable)

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        floor = severity_rank(self.min_severity)
        shown = [f for f in findings if severity_rank(f.severity) >= floor]
        charted = False
        for finding in shown:
            if finding.status == "resolved":
                line = f"gradwatch: {finding.title} {finding.message}"
                self._emit(Text(line, style="cyan"), line)
                continue
            with_chart = self.chart and not charted
            charted = charted or with_chart
            text = finding_text(finding)
            if with_chart:
                text += "\n" + gradient_flow_text(stats, rows=self.chart_rows)
            panel = finding_panel(finding, stats, chart=with_chart, chart_rows=self.chart_rows)
            self._emit(panel, text)

    def notice(self, text: str) -> None:
        self._emit(Text(text, style="dim"), text)

    def coverage(self, coverage: Coverage) -> None:
        self._coverage = coverage

    def close(self, summary: Sequence[SummaryRow]) -> None:
        if not self.summary:
            return
        rows = [r for r in summary if severity_rank(r.severity) >= severity_rank(self.min_severity)]
        coverage = getattr(self, "_coverage", None)
        if not rows:
            text = summary_text([], coverage)
            style = "yellow" if coverage is not None and coverage.nothing_measured else "green"
            self._emit(Text(text, style=style), text)
            return
        table = summary_table(rows)
        if coverage is not None:
            table.caption = f"over {coverage.describe()}"
        self._emit(table, summary_text(rows, coverage))


def _width() -> int | None:
    try:
        import shutil

        return max(80, min(140, shutil.get_terminal_size().columns))
    except Exception:
        return None
