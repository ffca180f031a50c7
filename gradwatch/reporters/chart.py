"""A compact gradient-flow chart: log-scale bars of gradient RMS by depth.

The person reading it sees at a glance where the signal dies: the bars shrink towards
the layers that barely learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..stats import LayerStats, StepStats
from .metrics import spread

BAR_WIDTH = 28
#: Layers whose gradient RMS is below this share of the largest are drawn as starved.
STARVED = 1e-3


def chart_layers(stats: StepStats, max_layers: int = 32) -> list[LayerStats]:
    """Layers with a gradient in forward order, evenly thinned to at most ``max_layers``
    (the first and last are always kept)."""
    layers = [s for s in stats.by_depth(with_gradient=True) if s.grad_rms is not None]
    return spread(layers, max_layers)


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
    name = layer.name or "<root>"
    return name if len(name) <= 28 else "…" + name[-27:]


def chart_title(stats: StepStats) -> str:
    return f"gradient flow at step {stats.step} (RMS, log scale, input side first)"


def gradient_flow_table(stats: StepStats, max_layers: int = 32) -> Group:
    """The chart as a rich renderable: a title line and one bar per layer."""
    layers = chart_layers(stats, max_layers)
    low, high = _scale(layers)
    top = 10**high if layers else 0.0
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("layer", style="dim", no_wrap=True)
    table.add_column("bar", no_wrap=True)
    table.add_column("rms", justify="right", no_wrap=True)
    for layer in layers:
        rms = layer.grad_rms
        length = bar_length(rms, low, high)
        if rms is None or not math.isfinite(rms):
            bar, style, value = Text("NaN/Inf", style="bold red"), "red", str(rms)
        else:
            style = "red" if top and rms < STARVED * top else "green"
            bar = Text("█" * length + "·" * (BAR_WIDTH - length), style=style)
            value = f"{rms:.1e}"
        table.add_row(_label(layer), bar, Text(value, style=style))
    return Group(Text(chart_title(stats), style="bold"), table)


def gradient_flow_text(stats: StepStats, max_layers: int = 32) -> str:
    """The chart as plain text, for logs and files."""
    layers = chart_layers(stats, max_layers)
    low, high = _scale(layers)
    top = 10**high if layers else 0.0
    lines = [chart_title(stats)]
    width = max((len(_label(s)) for s in layers), default=5)
    for layer in layers:
        rms = layer.grad_rms
        if rms is None or not math.isfinite(rms):
            lines.append(f"  {_label(layer):<{width}}  {'NaN/Inf':<{BAR_WIDTH}}  {rms}")
            continue
        length = bar_length(rms, low, high)
        mark = "!" if top and rms < STARVED * top else " "
        bar = "#" * length + "." * (BAR_WIDTH - length)
        lines.append(f" {mark}{_label(layer):<{width}}  {bar}  {rms:.1e}")
    return "\n".join(lines)
