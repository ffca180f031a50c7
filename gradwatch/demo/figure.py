"""The demo's gradient-flow figure: per-layer gradient RMS by depth, one curve per net.

Needs matplotlib (the ``plot`` extra); it is used through ``matplotlib.figure.Figure``
directly, so no GUI backend is chosen and pyplot's global state is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .extras import figure_class
from .run import NetRun

#: How far below the smallest non-zero value an exact zero is drawn (log axes have no 0).
FLOOR_DECADES = 2


def floor_for(values: Sequence[float]) -> float:
    """Where zeros go on a log axis: two decades under the smallest positive value.

    >>> floor_for([1e-3, 0.0, 1e-5])
    1e-07
    """
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return 1e-12
    return 10 ** (math.floor(math.log10(min(positive))) - FLOOR_DECADES)


def gradient_flow_figure(runs: Sequence[NetRun]) -> Any:
    """A matplotlib Figure: x is the weight layer (1 = input side), y its gradient RMS
    on a log scale. Each net's curve is labelled with its name (``line.get_label()``)."""
    figure = figure_class()(figsize=(9, 5.5), layout="constrained")
    ax = figure.add_subplot()
    values = [rms for run in runs for _, rms in run.layer_rms]
    floor = floor_for(values)
    any_zero = False
    for run in runs:
        if not run.layer_rms:
            continue
        ys = []
        for _, rms in run.layer_rms:
            if rms == 0 or not math.isfinite(rms):
                any_zero = True
                ys.append(floor)
            else:
                ys.append(rms)
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, label=run.net.name)
    ax.set_yscale("log")
    ax.set_xlabel("weight layer (1 = input side)")
    ax.set_ylabel("gradient RMS")
    steps = sorted({run.rms_step for run in runs if run.rms_step is not None})
    at = f"step {steps[0]}" if len(steps) == 1 else "the last monitored step"
    ax.set_title(f"gradwatch demo: gradient RMS by depth at {at}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if any_zero:
        ax.axhline(floor, color="dimgray", linestyle=":", linewidth=0.8, label="_floor")
        ax.annotate(
            f"exact zeros (and NaN) drawn at {floor:.0e}",
            xy=(0.01, 0.01),
            xycoords="axes fraction",
            fontsize="small",
            color="dimgray",
        )
    return figure


def check_image_path(path: str | os.PathLike[str]) -> None:
    """Fail early, before any training: matplotlib must be installed (the ``plot`` extra)
    and know the file's format. Raises MissingExtra or ValueError."""
    figure_class()
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(
            f"cannot draw {os.fspath(path)!r}: the file name must end in one of "
            f"{', '.join('.' + f for f in sorted(formats))} (e.g. .png)"
        )


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Write the figure as an image (format from the file name; PNG is the usual)."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=120)
