"""``gradwatch report RUN.jsonl``: what a recorded run found, and how its gradients moved.

Reads a file written by :class:`gradwatch.JsonlRecorder` (a truncated last line, from
a run that crashed, is skipped) and prints the findings, the end-of-run summary and the
gradient RMS of each layer over time; ``--png`` draws it as a layers x steps heatmap
with the per-layer gradient norms below.

>>> import gradwatch.cli
>>> gradwatch.cli.main(["report", "no-such-file.jsonl"])  # doctest: +SKIP
2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from .demo.extras import MissingExtra, figure_class
from .demo.figure import check_image_path, floor_for, save_figure, write_error
from .demo.table import Cell, print_table
from .findings import Finding
from .reporters.jsonl import Record, read_record
from .reporters.jsonl import _clean as json_safe  # NaN/Inf as strings, tuples as lists
from .reporters.terminal import SEVERITY_STYLE, finding_panel, finding_text
from .rules.engine import SummaryRow

#: Steps shown as columns of the text table at most (evenly spaced, first and last
#: included); fewer when the console is narrow.
TEXT_COLUMNS = 8
#: Characters of the "over time" sparkline at most (monitored steps evenly sampled).
SPARK_WIDTH = 24
_SPARK = "▁▂▃▄▅▆▇█"
#: Plain-text levels, low to high; "-" is kept for "not measured", " " for exactly 0.
_SPARK_PLAIN = ".:=+*#%@"
#: The fewest orders of magnitude a colour or character scale spans: a healthy layer's
#: gradient wobbles by a factor of 2 or 3 from step to step, and on a scale fitted to
#: that wobble alone it would look like a collapse.
MIN_DECADES = 4.0


class ReportError(Exception):
    """The file cannot be read as a gradwatch record; the message says why."""


def load(path: str | os.PathLike[str]) -> Record:
    """Read a record, turning every way a file can be wrong into a :class:`ReportError`."""
    file = Path(path)
    if not file.exists():
        raise ReportError(f"{file}: no such file")
    if file.is_dir():
        raise ReportError(f"{file} is a folder; pass one of its .jsonl files")
    try:
        record = read_record(file)
    except UnicodeDecodeError:
        raise ReportError(f"{file} is not a text file, so not a gradwatch JSONL record") from None
    except OSError as error:
        raise ReportError(f"{file}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:  # a line that is not JSON, before the last one
        # read_record's message begins with the file's name: say it once.
        reason = str(error).removeprefix(f"{file}: ").removeprefix(f"{path}: ")
        raise ReportError(f"{file} is not a valid gradwatch record: {reason}") from None
    except Exception as error:
        raise ReportError(
            f"{file} is not a gradwatch record ({type(error).__name__}: {error}); "
            "records are written by gradwatch.JsonlRecorder"
        ) from None
    if record.version is None and not record.steps and not record.findings:
        what = "is empty" if file.stat().st_size == 0 else "has no gradwatch lines"
        raise ReportError(
            f"{file} {what}: it is not a record written by gradwatch.JsonlRecorder "
            "(e.g. gradwatch demo --record DIR)"
        )
    return record


def gradient_layers(record: Record) -> list[str]:
    """Names of the layers that had a gradient in any step, input side first."""
    names: list[str] = []
    for stats in reversed(record.steps):
        for layer in stats.by_depth(with_gradient=True):
            if layer.grad_rms is not None and layer.name not in names:
                names.append(layer.name)
        if names:
            break
    for stats in record.steps:  # layers missing from the last step, e.g. frozen later
        for layer in stats.by_depth(with_gradient=True):
            if layer.grad_rms is not None and layer.name not in names:
                names.append(layer.name)
    return names


def series(record: Record, layer: str, field: str = "grad_rms") -> list[float | None]:
    """One value per monitored step (None where the layer was not measured)."""
    values: list[float | None] = []
    for stats in record.steps:
        entry = stats.layers.get(layer)
        value = getattr(entry, field, None) if entry is not None else None
        values.append(float(value) if value is not None else None)
    return values


def summary_rows(record: Record) -> list[SummaryRow]:
    """The recorded summary; for a run that stopped before ``close()``, one rebuilt
    from its findings."""
    if record.summary:
        return record.summary
    rows: dict[tuple[str, tuple[str, ...]], SummaryRow] = {}
    for finding in record.findings:
        if finding.status == "resolved":
            continue
        key = (finding.code, finding.layers)
        first = rows[key].first_step if key in rows else finding.step
        rows[key] = SummaryRow(
            code=finding.code,
            rule=finding.rule,
            severity=finding.severity,
            layers=finding.layers,
            first_step=first,
            last_step=finding.step,
            status="active",
        )
    return sorted(rows.values(), key=lambda r: (r.first_step, r.code))


# -- text ---------------------------------------------------------------------------------


def value_text(value: float | None) -> str:
    """A measured value for the text table: "0" for exactly zero, "-" for unmeasured.

    >>> value_text(0.0), value_text(None), value_text(1.25e-7)
    ('0', '-', '1.2e-07')
    """
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1e}"


def log_range(rows: Sequence[Sequence[float | None]]) -> tuple[float, float]:
    """The smallest and largest log10 of the positive, finite values in ``rows``: one
    scale for all of them (0.0, 0.0 when there are none).

    >>> log_range([[1e-3, 0.0, None], [1e-1]])
    (-3.0, -1.0)
    """
    logs = [
        math.log10(v) for row in rows for v in row if v is not None and v > 0 and math.isfinite(v)
    ]
    return (min(logs), max(logs)) if logs else (0.0, 0.0)


def widened(scale: tuple[float, float], decades: float = MIN_DECADES) -> tuple[float, float]:
    """``scale`` (low, high in log10) stretched about its middle to span at least
    ``decades``; a wider one is left as it is.

    >>> widened((-3.0, -2.0))
    (-4.5, -0.5)
    >>> widened((-28.0, -1.0))
    (-28.0, -1.0)
    """
    low, high = scale
    if high - low >= decades:
        return low, high
    middle = (low + high) / 2
    return middle - decades / 2, middle + decades / 2


def decade_text(log10_value: float) -> str:
    """A log10 position as the value it stands for.

    >>> decade_text(-4.5), decade_text(0.0)
    ('3e-05', '1e+00')
    """
    return f"{10**log10_value:.0e}"


def sparkline(
    values: Sequence[float | None],
    *,
    plain: bool = False,
    scale: tuple[float, float] | None = None,
) -> str:
    """The values on a log scale, ``scale`` = (low, high) in log10 (default: the values'
    own range); exactly 0 is a space, unmeasured "-", NaN/Inf "!".

    >>> sparkline([1e-3, 1e-2, 1e-1, 0.0, None], plain=True)
    '.*@ -'
    >>> sparkline([1e-3, 3e-3], plain=True, scale=(-12.0, -1.0))  # a 3x wobble stays flat
    '%%'
    """
    ramp = _SPARK_PLAIN if plain else _SPARK
    low, high = scale if scale is not None else log_range([values])
    out = []
    for value in values:
        if value is None:
            out.append("-")
        elif not math.isfinite(value):
            out.append("!")
        elif value <= 0:
            out.append(" ")
        elif high - low < 1e-12:
            out.append(ramp[-1])
        else:
            position = (math.log10(value) - low) / (high - low)
            out.append(ramp[max(0, min(len(ramp) - 1, int(position * len(ramp))))])
    return "".join(out)


def sample_indices(n: int, k: int = TEXT_COLUMNS) -> list[int]:
    """``k`` evenly spaced indices of ``n``, first and last included.

    >>> sample_indices(20, 4)
    [0, 6, 13, 19]
    """
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _severity(text: str) -> Text:
    return Text(text, style=SEVERITY_STYLE.get(text, ""))


def _layers(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(n or "<root>" for n in names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")


def _say(console: Console, text: str, style: str | None = None) -> None:
    """A line of text, no markup, wrapped at words to the console's width (plain text
    too: a log or a pipe gets lines no wider than the terminal would)."""
    if console.is_terminal:
        console.print(text, style=style, markup=False, highlight=False)
        return
    indent = " " * (len(text) - len(text.lstrip()) + 2)
    wrapped = textwrap.wrap(
        text,
        console.width,
        subsequent_indent=indent,
        break_long_words=False,  # file paths stay whole
        break_on_hyphens=False,
    )
    for part in wrapped or [""]:
        console.print(part, style=style, markup=False, highlight=False, soft_wrap=True)


def print_report(record: Record, path: str | os.PathLike[str], console: Console) -> None:
    """Header, findings, summary and the per-layer gradient RMS table."""
    steps = record.steps
    meta = ", ".join(f"{k}={v}" for k, v in record.meta.items())
    _say(console, f"gradwatch report: {path}", style="bold")
    if meta:
        _say(console, f"  run: {meta}")
    span = f"steps {steps[0].step}..{steps[-1].step}" if steps else "none"
    _say(
        console,
        f"  {len(steps)} monitored step(s) ({span}), {len(record.findings)} finding(s)"
        + (f", written by gradwatch {record.version}" if record.version else ""),
    )
    if record.truncated:
        _say(
            console,
            "  the last line was cut off (the run stopped mid-write); it is skipped",
            style="yellow",
        )
    if not record.summary and record.findings:
        _say(
            console,
            "  no end-of-run summary (the run did not close the watcher); "
            "rebuilt from the findings",
            style="yellow",
        )
    console.print()
    _print_findings(console, record.findings)
    console.print()
    _print_summary(console, summary_rows(record))
    if record.coverage is not None:
        nothing = record.coverage.nothing_measured
        text = record.coverage.describe() if nothing else f"over {record.coverage.describe()}"
        _say(console, f"  {text}", style="yellow" if nothing else None)
    console.print()
    _print_gradients(console, record)
    if any(s.update_ratio is not None for stats in steps for s in stats):
        console.print()
        _print_updates(console, record)


def _print_findings(console: Console, findings: Sequence[Finding]) -> None:
    """Each finding as the terminal showed it during the run: what, layers, evidence and
    fix (without the chart: the table below has every layer over time)."""
    if not findings:
        _say(console, "findings: none", style="green")
        return
    _say(console, f"findings ({len(findings)})", style="bold")
    for finding in findings:
        if finding.status == "resolved":
            _say(console, f"step {finding.step}: {finding.title} {finding.message}", style="cyan")
        elif console.is_terminal:
            console.print(finding_panel(finding, chart=False))
        else:
            _say_wrapped(console, finding_text(finding))


def _say_wrapped(console: Console, text: str) -> None:
    for line in text.splitlines():
        _say(console, line)


def _print_summary(console: Console, rows: Sequence[SummaryRow]) -> None:
    if not rows:
        _say(console, "summary: no findings", style="green")
        return
    cells: list[list[Cell]] = []
    for row in rows:
        status = "active" if row.status == "active" else f"resolved at {row.resolved_step}"
        cells.append(
            [
                f"{row.code} {row.rule}",
                _severity(row.severity),
                _layers(row.layers),
                str(row.first_step),
                str(row.last_step),
                status,
            ]
        )
    print_table(
        console,
        "summary",
        ("finding", "severity", "layers", "first step", "last step", "status"),
        cells,
        right=("first step", "last step"),
        keep_whole=("finding", "severity"),
    )


def _print_gradients(console: Console, record: Record) -> None:
    layers = gradient_layers(record)
    if not layers:
        _say(console, "gradient RMS: no layer gradients recorded")
        return
    plain = not console.is_terminal
    name_width = max(len("(global norm)"), *(len(n or "<root>") for n in layers))
    spark_steps = sample_indices(len(record.steps), SPARK_WIDTH)
    spark_width = max(len("over time"), len(spark_steps))
    # Each step column takes "1.5e-02" and the gap before it; rich adds borders too.
    room = console.width - name_width - spark_width - (8 if plain else 12)
    picks = sample_indices(len(record.steps), max(2, min(TEXT_COLUMNS, room // 10)))
    columns = ["layer", *(f"step {record.steps[i].step}" for i in picks), "over time"]
    per_layer = {name: series(record, name) for name in layers}
    scale = widened(log_range(per_layer.values()))
    rows: list[list[Cell]] = []
    for name, values in per_layer.items():
        line = sparkline([values[i] for i in spark_steps], plain=plain, scale=scale)
        rows.append([name or "<root>", *(value_text(values[i]) for i in picks), line])
    norms: list[float | None] = [s.global_grad_norm for s in record.steps]
    norm_scale = widened(log_range([norms]))
    rows.append(
        [
            "(global norm)",
            *(value_text(norms[i]) for i in picks),
            sparkline([norms[i] for i in spark_steps], plain=plain, scale=norm_scale),
        ]
    )
    every = (
        "every monitored step"
        if len(spark_steps) == len(record.steps)
        else f"{len(spark_steps)} of {len(record.steps)} monitored steps, evenly spaced"
    )
    ramp = _SPARK_PLAIN if plain else _SPARK
    low, high = scale
    print_table(
        console,
        "gradient RMS per layer (input side first) over monitored steps",
        columns,
        rows,
        right=columns[1:-1],
        keep_whole=("layer", "over time"),
        caption=f"over time: {every}, on one log scale for all layers: "
        f"'{ramp[0]}' = {decade_text(low)} or less, '{ramp[-1]}' = {decade_text(high)} "
        f"(the global norm on its own scale: {decade_text(norm_scale[0])} to "
        f"{decade_text(norm_scale[1])}); blank = exactly 0, '-' = not measured, "
        "'!' = NaN/Inf",
    )


# -- JSON ---------------------------------------------------------------------------------


def record_json(record: Record, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The record as one JSON-ready document, for scripts: what ``--json`` prints.

    Per layer (input side first), one value per monitored step in ``steps``: ``null``
    where the layer was not measured, ``0`` where its gradient was exactly 0, the
    string ``"nan"``/``"inf"`` where it was not finite.
    """
    rows = summary_rows(record)
    return json_safe(
        {
            "file": os.fspath(path),
            "gradwatch_version": record.version,
            "meta": record.meta,
            "truncated": record.truncated,
            "skipped_lines": record.skipped_lines,
            "steps": [s.step for s in record.steps],
            "findings": [f.to_dict() for f in record.findings],
            "summary": [dataclasses.asdict(row) for row in rows],
            "summary_rebuilt": not record.summary and bool(rows),
            "layers": [
                {
                    "name": name,
                    "grad_rms": series(record, name),
                    "grad_norm": series(record, name, "grad_norm"),
                }
                for name in gradient_layers(record)
            ],
            "global_grad_norm": [s.global_grad_norm for s in record.steps],
        }
    )


def _print_updates(console: Console, record: Record) -> None:
    """The update-to-weight ratio |Δw|/|w| of each layer over the monitored steps that
    measured it (about 1e-3 is healthy)."""
    layers = [
        n
        for n in gradient_layers(record)
        if any(v is not None for v in series(record, n, "update_ratio"))
    ]
    measured = [
        k for k, s in enumerate(record.steps) if any(x.update_ratio is not None for x in s)
    ]
    plain = not console.is_terminal
    name_width = max(len("layer"), *(len(n or "<root>") for n in layers))
    spark = [measured[i] for i in sample_indices(len(measured), SPARK_WIDTH)]
    room = console.width - name_width - max(len("over time"), len(spark)) - (8 if plain else 12)
    count = max(2, min(TEXT_COLUMNS, room // 10))
    picks = [measured[i] for i in sample_indices(len(measured), count)]
    columns = ["layer", *(f"step {record.steps[i].step}" for i in picks), "over time"]
    per_layer = {name: series(record, name, "update_ratio") for name in layers}
    scale = log_range(per_layer.values())
    rows: list[list[Cell]] = [
        [
            name or "<root>",
            *(value_text(values[i]) for i in picks),
            sparkline([values[i] for i in spark], plain=plain, scale=scale),
        ]
        for name, values in per_layer.items()
    ]
    print_table(
        console,
        "update / weight ratio |Δw|/|w| per layer over one optimizer step (about 1e-3 is healthy)",
        columns,
        rows,
        right=columns[1:-1],
        keep_whole=("layer", "over time"),
        caption="measured from a sample of the weights one step before each monitored step; "
        "blank = exactly 0 (the weights did not move), '-' = not measured",
    )


# -- figure -------------------------------------------------------------------------------


#: Heatmap cells that hold no value to colour, each drawn in a colour of its own that the
#: value scale (magma: black to pale yellow) does not use: label and colour.
CELL_KINDS: dict[str, tuple[str, str]] = {
    "zero": ("exactly 0", "#3b9ddd"),
    "unmeasured": ("not measured", "#e4e4e4"),
    "nonfinite": ("NaN/Inf", "#2ca02c"),
}
#: Layers named on the depth colour bar at most (evenly spread, first and last included).
DEPTH_TICKS = 12


def cell_kind(value: float | None) -> str:
    """What a heatmap cell shows: ``"value"`` or one of :data:`CELL_KINDS`.

    >>> [cell_kind(v) for v in (1e-3, 0.0, None, float("nan"))]
    ['value', 'zero', 'unmeasured', 'nonfinite']
    """
    if value is None:
        return "unmeasured"
    if not math.isfinite(value):
        return "nonfinite"
    return "zero" if value <= 0 else "value"


def heatmap_cells(record: Record, layers: Sequence[str]) -> list[list[str]]:
    """:func:`cell_kind` of each layer (row) at each monitored step (column)."""
    return [[cell_kind(v) for v in series(record, name)] for name in layers]


def report_figure(record: Record, figure: Any = None) -> Any:
    """A matplotlib Figure: top, a heatmap of gradient RMS (layers x monitored steps, log
    colour scale spanning at least :data:`MIN_DECADES`; exactly 0, not measured and
    NaN/Inf each in a colour of their own, named in a legend); bottom, each layer's
    gradient norm over time (log scale, coloured by layer). Finding steps are marked on
    both. ``figure``: a Figure or SubFigure to draw into (``gradwatch report A B --png``
    puts two side by side)."""
    Figure = figure_class()
    import matplotlib
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    layers = gradient_layers(record)
    steps = [s.step for s in record.steps]
    if figure is None:
        figure = Figure(figsize=(10, 8), layout="constrained")
    heat_ax, norm_ax = figure.subplots(2, 1, sharex=True)
    values = [series(record, name) for name in layers]
    kinds = heatmap_cells(record, layers)
    grid = [
        [math.log10(v) if kind == "value" and v is not None else math.nan for v, kind in zip(r, k)]
        for r, k in zip(values, kinds)
    ]
    low, high = widened(log_range(values))
    extent = _extent(steps, len(layers))
    image = heat_ax.imshow(
        grid or [[math.nan]],
        aspect="auto",
        interpolation="nearest",
        cmap=matplotlib.colormaps["magma"].with_extremes(bad=(0, 0, 0, 0)),
        vmin=low,
        vmax=high,
        extent=extent,
        origin="upper",
    )
    # The cells without a value, on top, one flat colour per kind.
    names = list(CELL_KINDS)
    others = [[names.index(k) if k in CELL_KINDS else math.nan for k in row] for row in kinds]
    heat_ax.imshow(
        others or [[math.nan]],
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap([colour for _, colour in CELL_KINDS.values()]).with_extremes(
            bad=(0, 0, 0, 0)
        ),
        vmin=-0.5,
        vmax=len(names) - 0.5,
        extent=extent,
        origin="upper",
    )
    present = [name for name in names if any(name in row for row in kinds)]
    if present:
        heat_ax.legend(
            handles=[
                Patch(facecolor=CELL_KINDS[n][1], edgecolor="dimgray", label=CELL_KINDS[n][0])
                for n in present
            ],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncols=len(present),
            frameon=False,
            fontsize=8,
        )
    bar = figure.colorbar(image, ax=heat_ax, label="gradient RMS (log scale)")
    bar.locator = MaxNLocator(integer=True)
    bar.formatter = FuncFormatter(lambda x, _: f"1e{x:.0f}")
    bar.update_ticks()
    heat_ax.set_ylabel("layer (input side at top)")
    if len(layers) <= 40:
        heat_ax.set_yticks([len(layers) - i - 0.5 for i in range(len(layers))])
        heat_ax.set_yticklabels([n or "<root>" for n in layers], fontsize=6)
    title = record.meta.get("model") or record.meta.get("label") or "recorded run"
    heat_ax.set_title(f"gradwatch report: {title} - gradient RMS per layer", loc="left")

    # One colour per layer, input side first; the colour bar names the layers.
    count = max(1, len(layers))
    colours = matplotlib.colormaps["viridis"].resampled(count)
    by_layer = BoundaryNorm([i - 0.5 for i in range(count + 1)], count)
    all_norms = [[_positive(v) for v in series(record, name, "grad_norm")] for name in layers]
    positive = [v for row in all_norms for v in row if not math.isnan(v)]
    floor = floor_for(positive)
    any_zero = False
    for index, (name, norms) in enumerate(zip(layers, all_norms)):
        colour = colours(by_layer(index))
        # NaN breaks the line where the norm is 0 or unmeasured (a log axis has no 0).
        if any(not math.isnan(v) for v in norms):
            norm_ax.plot(steps, norms, color=colour, linewidth=1, label=name)
        zeros = [s for s, v in zip(steps, series(record, name, "grad_norm")) if v == 0]
        if zeros:
            any_zero = True
            norm_ax.plot(zeros, [floor] * len(zeros), "v", color=colour, markersize=4,
                         label="_zero")
    norm_ax.set_yscale("log")
    norm_ax.set_xlabel("step")
    norm_ax.set_ylabel("gradient norm per layer")
    if any_zero:
        from matplotlib.lines import Line2D

        norm_ax.axhline(floor, color="dimgray", linestyle=":", linewidth=0.8, label="_floor")
        marker = Line2D([], [], color="dimgray", marker="v", linestyle=":", markersize=4)
        norm_ax.legend(
            [marker],
            [f"exactly 0 (drawn at {floor:.0e}); a gap: not measured"],
            loc="best",
            fontsize=8,
        )
    mappable = matplotlib.cm.ScalarMappable(norm=by_layer, cmap=colours)
    ticks = sample_indices(len(layers), DEPTH_TICKS)
    depth_bar = figure.colorbar(mappable, ax=norm_ax, ticks=ticks, label="layer (input side first)")
    depth_bar.ax.set_yticklabels([layers[i] or "<root>" for i in ticks], fontsize=7)
    depth_bar.minorticks_off()
    for finding in record.findings:
        if finding.status in ("new", "worse"):
            for ax in (heat_ax, norm_ax):
                ax.axvline(finding.step, color="red", linestyle="--", linewidth=0.8)
            heat_ax.annotate(
                finding.code,
                xy=(finding.step, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="red",
                rotation=90,
                va="top",
            )
    return figure


def _positive(value: float | None) -> float:
    if value is None or not math.isfinite(value) or value <= 0:
        return math.nan
    return value


def _extent(steps: Sequence[int], n_layers: int) -> tuple[float, float, float, float]:
    """Cells centred on their steps; rows from the bottom (last layer) to the top."""
    if not steps:
        return (0.0, 1.0, 0.0, 1.0)
    gap = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else 1.0
    return (steps[0] - gap / 2, steps[-1] + gap / 2, 0.0, float(max(1, n_layers)))


# -- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradwatch report``."""
    parser.add_argument("record", metavar="RUN.jsonl", help="a file written by JsonlRecorder")
    parser.add_argument(
        "other",
        nargs="?",
        metavar="OTHER.jsonl",
        help="a second record: the two runs side by side (findings each way, per-layer "
        "gradients at matching steps, the layers that changed most)",
    )
    parser.add_argument(
        "--png",
        metavar="FILE",
        help="draw a layers x steps heatmap of gradient RMS and the per-layer norms over "
        "time (needs the 'plot' extra: matplotlib)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the record as one JSON document (findings, summary, each layer's "
        "gradient RMS and norm per monitored step) instead of the text report",
    )


def load_for_command(
    paths: Sequence[str | os.PathLike[str]], png: str | None
) -> list[Record] | None:
    """The records at ``paths`` for ``gradwatch report``, the ``--png`` path checked first
    (said before the report is printed, not after); None once the reason it cannot is on
    stderr."""
    try:
        if png is not None:
            check_image_path(png)
        return [load(path) for path in paths]
    except (ReportError, MissingExtra, ValueError) as error:
        print(f"gradwatch report: {error}", file=sys.stderr)
    except OSError as error:
        print(f"gradwatch report: {write_error(error)}", file=sys.stderr)
    return None


def main(args: argparse.Namespace) -> int:
    """Entry point of ``gradwatch report`` (wired in :mod:`gradwatch.cli`)."""
    if getattr(args, "other", None) is not None:
        from .compare import main as compare_main

        return compare_main(args)
    path = args.record
    png = getattr(args, "png", None)
    records = load_for_command([path], png)
    if records is None:
        return 2
    (record,) = records
    as_json = getattr(args, "json", False)
    if as_json:
        print(json.dumps(record_json(record, path), indent=2, allow_nan=False))
    else:
        print_report(record, path, Console())
    if png is not None:
        figure = report_figure(record)
        try:
            save_figure(figure, png)
        except OSError as error:
            print(f"gradwatch report: {write_error(error)}", file=sys.stderr)
            return 2
        # with --json, standard output holds the document only
        print(f"figure: {png}", file=sys.stderr if as_json else sys.stdout)
    return 0
