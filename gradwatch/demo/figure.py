"""The demo's gradient-flow figure: per-layer gradient RMS by depth, one curve per net.

Needs matplotlib (the ``plot`` extra); it is used through ``matplotlib.figure.Figure``
directly, so no GUI backend is chosen and pyplot's global state is left alone.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .extras import figure_class

if TYPE_CHECKING:  # run.py trains with torch; drawing a figure does not need it
    from .run import NetRun

#: How far below the smallest non-zero value an exact zero is drawn (log axes have no 0).
FLOOR_DECADES = 2
#: The legend entry of the line where zeros are drawn.
ZERO_LABEL = "exactly 0 or NaN"


def floor_for(values: Sequence[float]) -> float:
    """Where zeros go on a log axis: two decades under the smallest positive value.

    >>> floor_for([1e-3, 0.0, 1e-5])
    1e-07
    """
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return 1e-12
    return 10 ** (math.floor(math.log10(min(positive))) - FLOOR_DECADES)


def by_depth(runs: Sequence[NetRun]) -> list[tuple[int, list[NetRun]]]:
    """The runs grouped by their number of weight layers, deepest first: one panel each,
    so that a 4-layer net is not squeezed into a corner of a 30-layer axis."""
    depths = sorted({len(run.layer_rms) for run in runs if run.layer_rms}, reverse=True)
    return [(depth, [run for run in runs if len(run.layer_rms) == depth]) for depth in depths]


def gradient_flow_figure(runs: Sequence[NetRun]) -> Any:
    """A matplotlib Figure: one panel per network depth; x is the weight layer (1 = input
    side), y its gradient RMS on a log scale shared by the panels. Each net's curve is
    labelled with its name (``line.get_label()``)."""
    groups = by_depth(runs)
    figure = figure_class()(figsize=(5 + 4 * max(1, len(groups)), 5.5), layout="constrained")
    axes = figure.subplots(1, max(1, len(groups)), sharey=True, squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    values = [rms for run in runs for _, rms in run.layer_rms]
    floor = floor_for(values)
    # One colour per network across the panels.
    colours = {run.net.name: f"C{index % 10}" for index, run in enumerate(runs)}
    for ax, (depth, members) in zip(axes, groups):
        panel_zero = False
        for run in members:
            ys = []
            for _, rms in run.layer_rms:
                if rms == 0 or not math.isfinite(rms):
                    panel_zero = True
                    ys.append(floor)
                else:
                    ys.append(rms)
            xs = list(range(1, len(ys) + 1))
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                linewidth=1.6,
                label=run.net.name,
                color=colours[run.net.name],
            )
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"weight layer (1 = input side, {depth} = output)")
        ax.set_title(f"{depth}-layer networks", fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
        if panel_zero:  # said in the panel that has them, as an entry of its legend
            ax.axhline(
                floor,
                color="dimgray",
                linestyle=":",
                linewidth=0.8,
                label=f"{ZERO_LABEL} (drawn at {floor:.0e})",
            )
        ax.legend(fontsize="small", loc="best")
    axes[0].set_ylabel("gradient RMS")
    steps = sorted({run.rms_step for run in runs if run.rms_step is not None})
    at = f"step {steps[0]}" if len(steps) == 1 else "the last monitored step"
    figure.suptitle(f"gradwatch demo: gradient RMS by depth at {at}")
    return figure


def check_image_path(path: str | os.PathLike[str]) -> None:
    """Fail early, before any training: matplotlib must be installed (the ``plot`` extra),
    know the file's format, and the file must be writable. Raises MissingExtra,
    ValueError, or OSError (with the file name) when the file cannot be written."""
    figure_class()
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(
            f"cannot draw {os.fspath(path)!r}: the file name must end in one of "
            f"{', '.join('.' + f for f in sorted(formats))} (e.g. .png)"
        )
    check_writable(path)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise the OSError that writing ``path`` later would raise, now: its folder is
    created if missing, and the file is opened for appending (which changes nothing)
    and removed again if it did not exist.

    >>> import tempfile
    >>> check_writable(os.path.join(tempfile.mkdtemp(), "sub", "flow.png"))
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file", os.fspath(path))
    existing = next((p for p in target.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", os.fspath(existing))
    target.parent.mkdir(parents=True, exist_ok=True)
    existed = target.exists()
    with target.open("ab"):
        pass
    if not existed:
        target.unlink()


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Write the figure as an image (format from the file name; PNG is the usual)."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=120)


def write_error(error: OSError) -> str:
    """"cannot write FILE: reason", naming the file once.

    >>> write_error(PermissionError(13, "Permission denied", "/flow.png"))
    'cannot write /flow.png: Permission denied'
    """
    where = f" {error.filename}" if error.filename else ""
    return f"cannot write{where}: {error.strerror or error}"
