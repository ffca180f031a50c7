"""gradwatch on TensorBoard, for plain PyTorch loops: per-layer scalars, findings as text,
and a gradient-flow figure when a finding starts.

>>> import gradwatch
>>> from gradwatch.integrations.tensorboard import TensorBoardReporter
>>> watcher = gradwatch.watch(model, reporters=[*gradwatch.default_reporters(),
...                                             TensorBoardReporter("runs/tb")])  # doctest: +SKIP

or, without touching the script: ``gradwatch run --tensorboard runs/tb train.py``.

What lands in the log folder, at each monitored step and at that training step (nothing is
written on the steps in between):

- scalars, the same keys as the Lightning and W&B integrations:
  ``gradwatch/<stat>/<layer>`` (``grad_norm``, ``grad_rms``, ``active_fraction`` of ReLU
  layers, ``saturated_fraction`` of sigmoid/tanh layers, by default) for up to
  ``max_layers`` layers, ``gradwatch/global_grad_norm``, ``gradwatch/global_param_norm``
  (on detail steps), and ``gradwatch/findings/<code>`` (announcements so far);
- text ``gradwatch/findings``: each finding as the terminal shows it (what, layers,
  evidence, fix), at its step; at ``close()``, ``gradwatch/summary``;
- image ``gradwatch/gradient_flow`` when a finding starts or gets worse (matplotlib needed;
  without it the figure is skipped): the layers x steps heatmap of gradient RMS and the
  per-layer norms over time, as ``gradwatch report --png`` draws it.

Lightning and the Transformers Trainer need none of this: their callbacks put the same
keys in the rows the framework logs, which reach its TensorBoard logger.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gradwatch.findings import Finding
from gradwatch.guard import short_error, warn_user
from gradwatch.reporters.base import Reporter
from gradwatch.reporters.jsonl import Record
from gradwatch.reporters.metrics import DEFAULT_STATS, LayerSelection, check_stats, global_metrics
from gradwatch.reporters.terminal import finding_text, summary_text
from gradwatch.rules.engine import SummaryRow
from gradwatch.stats import StepStats
from gradwatch.validation import whole_number

from ._requires import require

#: Monitored steps the figure shows at most (the most recent).
FIGURE_STEPS = 64


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard``, or a ``ModuleNotFoundError`` naming what to install."""
    require("tensorboard", extra="tensorboard", integration="gradwatch.integrations.tensorboard")
    from torch.utils import tensorboard

    return tensorboard


class TensorBoardReporter(Reporter):
    """Writes gradwatch's statistics and findings to TensorBoard event files.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (the script's own: gradwatch's
            values join its run) or a log folder (a writer is made, and closed at
            ``close()``).
        prefix: first part of every tag.
        stats: per-layer statistics to write (names from
            :data:`gradwatch.reporters.metrics.LAYER_STATS`).
        max_layers: at most this many layers get per-layer scalars (spread evenly in
            depth, first and last kept); ``None`` for all.
        figure: draw the gradient-flow figure when a finding starts (needs matplotlib).

    >>> import tempfile, torch, gradwatch
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> folder = tempfile.mkdtemp()
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> watcher = gradwatch.watch(model, every_n_steps=1, reporters=[TensorBoardReporter(folder)])
    >>> model(torch.randn(16, 4)).sum().backward()
    >>> _ = watcher.step()
    >>> watcher.close()
    >>> events = EventAccumulator(folder)
    >>> _ = events.Reload()
    >>> "gradwatch/grad_rms/0" in events.Tags()["scalars"]
    True
    """

    name = "tensorboard"

    def __init__(
        self,
        writer: Any = None,
        *,
        prefix: str = "gradwatch",
        stats: Sequence[str] = DEFAULT_STATS,
        max_layers: int | None = 50,
        figure: bool = True,
    ) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(
                f"prefix must be a non-empty string such as 'gradwatch', got {prefix!r}"
            )
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        check_stats(stats)
        whole_number("max_layers", max_layers, allow_none=True)
        tensorboard = require_tensorboard()
        if writer is None or isinstance(writer, (str, os.PathLike)):
            self.writer = tensorboard.SummaryWriter(log_dir=writer)
            self._owns_writer = True
        elif callable(getattr(writer, "add_scalar", None)):
            self.writer = writer
            self._owns_writer = False
        else:
            raise ValueError(
                "writer must be a torch.utils.tensorboard.SummaryWriter or a log folder, "
                f"got {type(writer).__name__}"
            )
        self.prefix = prefix.strip("/")
        self.figure = bool(figure) and _matplotlib_installed()
        self._layers = LayerSelection(stats, max_layers)
        self._counts: Counter[str] = Counter()
        self._recent: list[StepStats] = []
        self._findings: list[Finding] = []

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        step = stats.step
        for finding in findings:
            if finding.status in ("new", "worse", "reminder"):
                self._counts[finding.code] += 1
        values = global_metrics(stats, self.prefix)
        values.update(self._layers.metrics(stats, self.prefix))
        for code, count in sorted(self._counts.items()):
            values[f"{self.prefix}/findings/{code}"] = float(count)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        for finding in findings:
            self.writer.add_text(f"{self.prefix}/findings", _markdown(finding_text(finding)), step)
        self._remember(stats, findings)
        if self.figure and any(f.status in ("new", "worse") for f in findings):
            self._draw(step)

    def close(self, summary: Sequence[SummaryRow]) -> None:
        step = self._recent[-1].step if self._recent else 0
        self.writer.add_text(f"{self.prefix}/summary", _markdown(summary_text(summary)), step)
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def _remember(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        self._recent.append(stats)
        del self._recent[:-FIGURE_STEPS]
        self._findings.extend(findings)
        oldest = self._recent[0].step
        self._findings = [f for f in self._findings if f.step >= oldest]

    def _draw(self, step: int) -> None:
        from gradwatch.report import report_figure

        try:
            record = Record(steps=list(self._recent), findings=list(self._findings))
            image = _pixels(report_figure(record))
        except Exception as error:  # the figure is an extra: scalars and text go on
            self.figure = False
            reason = short_error(error)
            warn_user(f"gradwatch: the TensorBoard gradient-flow figure is off ({reason})")
            return
        self.writer.add_image(f"{self.prefix}/gradient_flow", image, step, dataformats="HWC")


def _matplotlib_installed() -> bool:
    """Imports matplotlib now, while the watcher is set up, rather than inside a training
    step when the first finding comes."""
    from gradwatch.demo.extras import MissingExtra, figure_class

    try:
        figure_class()
    except MissingExtra:
        return False
    return True


def _pixels(figure: Any) -> Any:
    """The figure as an RGB array, drawn without pyplot (no GUI backend is chosen)."""
    import numpy
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return numpy.asarray(canvas.buffer_rgba())[..., :3].copy()


def _markdown(text: str) -> str:
    """TensorBoard renders text as Markdown: keep the plain lines as they are."""
    return "\n".join(f"    {line}" for line in text.splitlines())


__all__ = ["TensorBoardReporter", "require_tensorboard"]
