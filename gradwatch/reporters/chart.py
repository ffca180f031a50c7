"""A compact gradient-flow chart: log-scale bars of gradient RMS by depth.

The person reading it sees at a glance where the signal dies: the bars shrink towards
the layers that barely learn. In a terminal a deep network is shown by a few telling
rows (:func:`telling_rows`); the record (``gradwatch report``), its PNG and the W&B
chart keep every layer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..stats import LayerStats, StepStats
from ..wording import display_name
from .metrics import spread

BAR_WIDTH = 28
#: Layers whose gradient RMS is below this share of the largest are drawn as starved.
STARVED = 1e-3
#: Rows a terminal chart shows at most (``TerminalReporter(chart_rows=...)``).
TERMINAL_ROWS = 8


def chart_layers(stats: StepStats, max_layers: int = 32) -> list[LayerStats]:
    """Layers with a gradient in forward order, evenly thinned to at most ``max_layers``
    (the first and last are always kept)."""
    layers = [s for s in stats.by_depth(with_gradient=True) if s.grad_rms is not None]
    return spread(layers, max_layers)


def cliff(values: Sequence[float | None]) -> int | None:
    """Index ``i`` of the steepest change in log scale between neighbours ``i`` and
    ``i + 1`` (an exact zero next to a non-zero value is the steepest there can be;
    the first NaN/Inf next to a finite value too). None for fewer than two values.

    >>> cliff([0.0, 0.0, 1e-20, 1e-19, 1e-3])
    1
    >>> cliff([1e-2, 1e-2, 1e-6, 1e-5])
    1
    """
    if len(values) < 2:
        return None

    def kind(value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "bad"
        return "zero" if value <= 0 else "value"

    def step(i: int) -> float:
        a, b = values[i], values[i + 1]
        if kind(a) != kind(b):
            return math.inf  # the gradient stops, or turns to NaN/Inf, right here
        if kind(a) != "value":
            return 0.0
        return abs(math.log10(b) - math.log10(a))  # type: ignore[arg-type]

    return max(range(len(values) - 1), key=step)


def telling_rows(layers: Sequence[LayerStats], limit: int | None) -> list[LayerStats]:
    """At most ``limit`` of ``layers`` (in forward order) that tell the story: the first,
    the last, both sides of the steepest drop, the first NaN/Inf, and evenly spaced
    layers between. All of them when ``limit`` is None or not exceeded.

    >>> names = [LayerStats(name=f"l{i}", kind="linear", grad_rms=r) for i, r in
    ...          enumerate([0.0] * 20 + [1e-9 * 10**i for i in range(10)])]
    >>> [layer.name for layer in telling_rows(names, 6)]
    ['l0', 'l9', 'l14', 'l19', 'l20', 'l29']
    """
    if limit is None or len(layers) <= limit:
        return list(layers)
    last = len(layers) - 1
    wanted = [0, last]
    at = cliff([layer.grad_rms for layer in layers])
    if at is not None:
        wanted += [at, at + 1]
    bad = next(
        (i for i, s in enumerate(layers) if s.grad_rms is None or not math.isfinite(s.grad_rms)),
        None,
    )
    if bad is not None:
        wanted.append(bad)
    picked: set[int] = set()
    for index in wanted:
        if len(picked) < max(limit, 2):
            picked.add(index)
    # Then fill the widest gaps, so the other rows spread evenly over the depth.
    while len(picked) < limit:
        ordered = sorted(picked)
        start, end = max(itertools.pairwise(ordered), key=lambda pair: pair[1] - pair[0])
        if end - start < 2:
            break
        picked.add((start + end) // 2)
    return [layers[i] for i in sorted(picked)]


def _scale(layers: Sequence[LayerStats]) -> tuple[float, float]:
    values = [s.grad_rms for s in layers if s.grad_rms and math.isfinite(s.grad_rms)]
    if not values:
        return 0.0, 0.0
    return math.log10(min(values)), math.log10(max(values))


def bar_length(rms: float | None, low: float, high: float, width: int = BAR_WIDTH) -> int:
    """Bar length for a value on the chart's log scale (0 for 0 or non-finite)."""
    if not rms or not math.isfinite(rms):
        return 0
    if high - low < 1e-12:
        return width
    return max(1, round(width * (math.log10(rms) - low + 0.25) / (high - low + 0.25)))


def _label(layer: LayerStats) -> str:
    name = display_name(layer.name)
    return name if len(name) <= 28 else "…" + name[-27:]


def chart_title(stats: StepStats, shown: int | None = None, total: int | None = None) -> str:
    some = f"; {shown} of {total} layers" if shown is not None and total and shown < total else ""
    return f"gradient flow at step {stats.step} (RMS, log scale, input side first{some})"


def _rows(stats: StepStats, max_layers: int, rows: int | None) -> tuple[list[LayerStats], str]:
    """The layers to draw and the chart's title. The bars' scale comes from all of them,
    so a sampled chart draws each row exactly as the full one would."""
    layers = chart_layers(stats, max_layers)
    shown = telling_rows(layers, rows)
    return shown, chart_title(stats, len(shown), len(layers))


def gradient_flow_table(
    stats: StepStats, max_layers: int = 32, rows: int | None = None
) -> Group:
    """The chart as a rich renderable: a title line and one bar per layer; ``rows``
    limits the bars to the telling ones (:func:`telling_rows`)."""
    everything = chart_layers(stats, max_layers)
    layers, title = _rows(stats, max_layers, rows)
    low, high = _scale(everything)
    top = 10**high if everything else 0.0
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("layer", style="dim", no_wrap=True)
    table.add_column("bar", no_wrap=True)
    table.add_column("rms", justify="right", no_wrap=True)
    updates = _has_updates(layers)
    if updates:
        table.add_column("update", justify="right", no_wrap=True, style="dim")
    for layer in layers:
        rms = layer.grad_rms
        length = bar_length(rms, low, high)
        if rms is None or not math.isfinite(rms):
            bar, style, value = Text("NaN/Inf", style="bold red"), "red", str(rms)
        else:
            style = "red" if top and rms < STARVED * top else "green"
            bar = Text("█" * length + "·" * (BAR_WIDTH - length), style=style)
            value = f"{rms:.1e}"
        cells = [_label(layer), bar, Text(value, style=style)]
        if updates:
            cells.append(update_text(layer.update_ratio))
        table.add_row(*cells)
    return Group(Text(title, style="bold"), table)


def gradient_flow_text(stats: StepStats, max_layers: int = 32, rows: int | None = None) -> str:
    """The chart as plain text, for logs and files (``!`` marks a starved layer)."""
    everything = chart_layers(stats, max_layers)
    layers, title = _rows(stats, max_layers, rows)
    low, high = _scale(everything)
    top = 10**high if everything else 0.0
    lines = [title]
    width = max((len(_label(s)) for s in layers), default=5)
    updates = _has_updates(layers)
    for layer in layers:
        rms = layer.grad_rms
        if rms is None or not math.isfinite(rms):
            lines.append(f"  {_label(layer):<{width}}  {'NaN/Inf':<{BAR_WIDTH}}  {rms}")
            continue
        length = bar_length(rms, low, high)
        mark = "!" if top and rms < STARVED * top else " "
        bar = "#" * length + "." * (BAR_WIDTH - length)
        update = f"  {update_text(layer.update_ratio)}" if updates else ""
        lines.append(f" {mark}{_label(layer):<{width}}  {bar}  {rms:.1e}{update}")
    return "\n".join(lines)


def _has_updates(layers: Sequence[LayerStats]) -> bool:
    return any(s.update_ratio is not None for s in layers)


def update_text(ratio: float | None) -> str:
    """A layer's update-to-weight ratio for the chart's last column.

    >>> update_text(1.234e-3), update_text(None)
    ('Δw/w=1.2e-03', '')
    """
    return f"Δw/w={ratio:.1e}" if ratio is not None else ""
