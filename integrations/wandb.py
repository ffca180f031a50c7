"""gradwatch on Weights & Biases: per-layer metrics, a gradient-flow chart, and alerts.

>>> import wandb, gradwatch
>>> from gradwatch.integrations.wandb import WandbReporter
>>> run = wandb.init(project="my-project")                      # doctest: +SKIP
>>> watcher = gradwatch.watch(model, reporters=[WandbReporter()])  # doctest: +SKIP

With Lightning nothing is needed: ``GradWatchCallback`` finds an attached ``WandbLogger``
and adds ``WandbReporter(run=wandb_logger.experiment)`` itself.

What lands in the run (``gradwatch`` is the ``prefix=``):

- history, at each monitored step: ``gradwatch/<stat>/<layer>`` for up to ``max_layers``
  layers (``grad_norm``, ``grad_rms``, ``active_fraction`` of ReLU layers,
  ``saturated_fraction`` of sigmoid/tanh layers, by default), ``gradwatch/global_grad_norm``,
  ``gradwatch/global_param_norm``, ``gradwatch/grad_rms_ratio`` (first layer's gradient RMS
  over the last's), ``gradwatch/findings/<code>`` (announcements so far),
  ``gradwatch/active_findings``, and ``gradwatch/step``, the training step they belong to;
- ``gradwatch/gradient_flow``: a line chart of log10 gradient RMS against depth (input
  side first), one line per recent charted step, every ``chart_every`` monitored steps and
  whenever a finding starts: the run page shows where the signal dies;
- an alert (``run.alert``) when a finding starts: title ``"GW101 vanishing-gradient"``,
  text with the message, layers, evidence and fix, level ``WARN`` for warnings and
  ``ERROR`` for errors;
- at ``watcher.close()``: a ``gradwatch/findings_table`` table of every finding and
  ``run.summary`` entries ``gradwatch/<code>/count``, ``gradwatch/<code>/first_step``,
  ``gradwatch/<code>/status``, ``gradwatch/problems`` and ``gradwatch/active_problems``.
  Close the watcher before ``run.finish()``; the reporter never finishes your run.

Which alerts (W&B sends them by e-mail or Slack, so only changes that need action):
``"new"`` findings at or above ``alert_severity``; ``"worse"`` ones only when the severity
rose above what was already alerted for that rule (a warning that became an error), with
``alert_on_worse=True``; ``"reminder"`` never (the problem was announced and the run page
shows it persists); ``"resolved"`` as an ``INFO`` alert titled
``"GW101 vanishing-gradient resolved"`` with ``alert_on_resolved=True``, for rules that
alerted. ``alert_wait_duration`` is passed to W&B, which holds back an alert with the
same title sent again within that many seconds.

How the values line up with your steps (measured with wandb 0.31; see the tests):

- ``run.log(..., step=s)`` with gradwatch's step would fight your counter: a larger ``s``
  moves W&B's step forward, so your next ``run.log()`` lands at ``s``, and a smaller one
  is dropped with a warning (a user logging twice per step is always ahead of us).
- ``run.log(..., commit=False)`` adds the values to the row you are building and never
  moves the step: if you call ``run.log()`` once per step after ``watcher.step()``, the
  values land in exactly that step's row (``_step`` equals the training step). If you
  log before ``watcher.step()``, or log each step with ``step=``, they land one row off
  (the row still open is the previous step's). If you log rarely, or not at all, the
  next uncommitted write would overwrite the previous one: values would be lost.

So the reporter writes with ``commit=False`` and, when W&B's step has not moved since its
previous write (you logged nothing in between, so that write is still uncommitted), it
first commits that row (``run.log({})``). Nothing is lost, and the step moves only when
you logged nothing for a whole ``every_n_steps`` interval: then W&B's ``_step`` counts
gradwatch's rows as well as yours (log with ``step=`` or plot against your own step
metric if that matters; explicit increasing ``step=`` values are never dropped). Every
row also carries ``gradwatch/step``, and each ``gradwatch/...`` metric is defined with
``run.define_metric(key, step_metric="gradwatch/step")``, so the charts plot against the
training step whichever row a value landed in (on a GPU the statistics are read one
monitored step later, so they land a row or more late; ``gradwatch/step`` still says
which step they describe). The keys are defined by name, not with a ``gradwatch/*``
glob: W&B picks among matching globs in no fixed order, and Lightning's ``WandbLogger``
defines ``*`` (against ``trainer/global_step``), which would then win at random. Under
Lightning the training step is ``trainer.global_step``, and the callback's own logging
of the same keys goes into the same row.

Distributed training: add the reporter on the rank that called ``wandb.init()`` (rank 0);
the Lightning callback does that itself.

W&B trouble never stops training: the first exception from wandb is logged once (logger
"gradwatch") and the reporter switches itself off. With ``WANDB_MODE=disabled`` the
reporter does nothing.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from gradwatch.findings import SEVERITIES, Finding, severity_rank
from gradwatch.guard import GradwatchWarning, warn_user
from gradwatch.reporters.base import Reporter
from gradwatch.reporters.chart import chart_layers
from gradwatch.reporters.metrics import (
    DEFAULT_STATS,
    LAYER_STATS,
    LayerSelection,
    check_stats,
    global_metrics,
)
from gradwatch.reporters.terminal import evidence_text, finding_fields
from gradwatch.rules.engine import SummaryRow
from gradwatch.stats import LayerStats, StepStats
from gradwatch.validation import whole_number

logger = logging.getLogger("gradwatch")


ALERT_LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
_ANNOUNCING = ("new", "worse", "reminder")  # statuses that say a problem is present
_TITLE_LIMIT = 63  # W&B: "must be less than 64 characters long"
_TEXT_LIMIT = 3000
_SHOWN_LAYERS = 12
_TABLE_LIMIT = 2000  # findings kept for the closing table


class WandbReporter(Reporter):
    """Sends gradwatch's statistics, charts, alerts and summary to a W&B run.

    Args:
        run: the ``wandb`` run to write to. ``None`` (default): ``wandb.run`` at the first
            monitored step (call ``wandb.init()`` before training).
        prefix: first part of every key (``"gradwatch"`` gives ``gradwatch/grad_rms/0``).
        alert_severity: the least severity that raises a W&B alert (``"info"``,
            ``"warning"``, ``"error"``); ``None`` sends no alerts.
        alert_wait_duration: seconds (or a ``timedelta``) passed to ``run.alert`` as
            ``wait_duration``: W&B holds back an alert with the same title within it.
        alert_on_resolved: also send an ``INFO`` alert when an alerted problem clears.
        alert_on_worse: alert again when a problem's severity rises above the one alerted.
        stats: per-layer statistics to log (names from :data:`LAYER_STATS`); ``()`` logs
            only the global ones.
        max_layers: at most this many layers get per-layer keys and chart points (spread
            evenly in depth, first and last kept); ``None`` for all.
        chart_every: draw the gradient-flow chart every this many monitored steps (and
            when a finding starts); ``None`` for no chart.
        chart_history: how many charted steps the chart shows, one line each.
        findings_table: log the table of findings at ``close()``.
        metrics: log the per-step metrics; ``False`` leaves them to someone else (the
            Lightning callback sends them through the ``WandbLogger``, in rows stamped with
            ``trainer/global_step``) and keeps the chart, alerts and summary.

    Example (offline, nothing is sent):

    >>> import os, torch, wandb, gradwatch
    >>> os.environ["WANDB_MODE"] = "offline"                               # doctest: +SKIP
    >>> run = wandb.init(project="gradwatch-demo")                         # doctest: +SKIP
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> watcher = gradwatch.watch(model, reporters=[WandbReporter(run)])   # doctest: +SKIP
    >>> # ... train: loss.backward(); watcher.step(); optimizer.step(); run.log({"loss": loss})
    >>> watcher.close(); run.finish()                                      # doctest: +SKIP
    """

    name = "wandb"

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = "gradwatch",
        alert_severity: str | None = "warning",
        alert_wait_duration: float | timedelta = 300,
        alert_on_resolved: bool = False,
        alert_on_worse: bool = True,
        stats: Sequence[str] = DEFAULT_STATS,
        max_layers: int | None = 32,
        chart_every: int | None = 10,
        chart_history: int = 5,
        findings_table: bool = True,
        metrics: bool = True,
    ) -> None:
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(
                f"prefix must be a non-empty string such as 'gradwatch', got {prefix!r}"
            )
        if alert_severity is not None and alert_severity not in SEVERITIES:
            raise ValueError(
                f"alert_severity must be one of {', '.join(SEVERITIES)} or None (no alerts), "
                f"got {alert_severity!r}"
            )
        if isinstance(alert_wait_duration, timedelta):
            wait = alert_wait_duration.total_seconds()
        elif isinstance(alert_wait_duration, (int, float)) and not isinstance(
            alert_wait_duration, bool
        ):
            wait = float(alert_wait_duration)
        else:
            wait = -1.0
        if not (wait > 0 and math.isfinite(wait)):
            raise ValueError(
                "alert_wait_duration must be a positive number of seconds or a timedelta, "
                f"got {alert_wait_duration!r}"
            )
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        check_stats(tuple(stats))
        whole_number("max_layers", max_layers, allow_none=True)
        whole_number("chart_every", chart_every, allow_none=True)
        whole_number("chart_history", chart_history)

        self._wandb = _import_wandb()
        self.prefix = prefix.strip("/")
        self.alert_severity = alert_severity
        self.alert_wait_duration = wait
        self.alert_on_resolved = bool(alert_on_resolved)
        self.alert_on_worse = bool(alert_on_worse)
        self.stats = stats
        self.max_layers = max_layers
        self.chart_every = chart_every
        self.chart_history = chart_history
        self.findings_table = bool(findings_table)
        self.log_metrics = bool(metrics)

        self._run = run
        self._ready = False
        #: Why the reporter switched itself off (``None`` while it works).
        self.disabled: str | None = None
        self._said_no_run = False
        self._closed = False
        self._defined: set[str] = set()
        self._layers = LayerSelection(self.stats, max_layers)
        self._pending_step: int | None = None  # W&B step of our last uncommitted write
        self._step_readable = True
        self._monitored = 0
        self._charts: list[tuple[int, list[LayerStats]]] = []
        self._charted_step: int | None = None
        self._latest: StepStats | None = None
        self._counts: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._alerted: dict[str, str] = {}  # rule code -> highest severity alerted
        self._findings: list[Finding] = []
        self.alerts_sent = 0

    # -- public ----------------------------------------------------------------------------

    @property
    def run(self) -> Any:
        """The W&B run written to (``None`` until one is known)."""
        return self._run

    @property
    def active(self) -> bool:
        """False once the reporter has switched itself off (or W&B is disabled)."""
        return self.disabled is None and not self._closed

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        if not self.active:
            return
        self._remember(findings)
        self._latest = stats
        run = self._resolve_run()
        if run is None:
            return
        try:
            self._setup(run)
            if self.disabled is not None:
                return
            for finding in findings:
                self._maybe_alert(run, finding)
            chart = self._chart_due(findings)
            if not self.log_metrics and not chart:
                return
            data = self.metrics(stats) if self.log_metrics else {f"{self.prefix}/step": stats.step}
            if chart:
                data.update(self._chart(stats))
            self._define(run, data)
            self._write(run, data)
        except Exception as error:  # W&B trouble must not reach training
            self._fail(error)
        finally:
            self._monitored += 1

    def close(self, summary: Sequence[SummaryRow]) -> None:
        if self._closed:
            return
        if self.disabled is None and self._run is not None and self._ready:
            try:
                self._finish(self._run, summary)
            except Exception as error:  # the run may have failed or finished
                self._fail(error)
        self._closed = True

    def metrics(self, stats: StepStats) -> dict[str, float]:
        """The numbers logged for one monitored step (without the chart)."""
        p = self.prefix
        out: dict[str, float] = {f"{p}/step": int(stats.step)}
        out.update(global_metrics(stats, p))
        ratio = _first_to_last_ratio(stats)
        if ratio is not None:
            out[f"{p}/grad_rms_ratio"] = ratio
        before = self._layers.names
        out.update(self._layers.metrics(stats, p))
        if before is None and self._layers.names and self._layers.candidates > len(
            self._layers.names
        ):
            logger.info(
                "gradwatch: W&B gets per-layer keys for %d of %d layers (max_layers=%s), "
                "spread evenly in depth.",
                len(self._layers.names),
                self._layers.candidates,
                self.max_layers,
            )
        for code, count in sorted(self._counts.items()):
            out[f"{p}/findings/{code}"] = count
        out[f"{p}/active_findings"] = sum(self._active.values())
        return out

    # -- setup -----------------------------------------------------------------------------

    def _resolve_run(self) -> Any:
        if self._run is None:
            self._run = self._wandb.run
            if self._run is None:
                if not self._said_no_run:
                    self._said_no_run = True
                    text = (
                        "gradwatch: WandbReporter has no W&B run: call wandb.init() before "
                        "training, or pass WandbReporter(run=...). Nothing is sent to W&B until "
                        "a run exists."
                    )
                    warn_user(text)
                return None
        return self._run

    def _setup(self, run: Any) -> None:
        if self._ready:
            return
        self._ready = True
        if getattr(run, "disabled", False):
            self.disabled = "W&B is disabled (WANDB_MODE=disabled or mode='disabled')"
            logger.debug("gradwatch: %s; the W&B reporter does nothing.", self.disabled)
            return
        run.define_metric(f"{self.prefix}/step")

    def _define(self, run: Any, data: dict[str, Any]) -> None:
        """Plot every gradwatch metric against the training step (see the module notes)."""
        step_key = f"{self.prefix}/step"
        for key, value in data.items():
            if key == step_key or key in self._defined or not isinstance(value, (int, float)):
                continue
            run.define_metric(key, step_metric=step_key)
            self._defined.add(key)

    # -- writing ---------------------------------------------------------------------------

    def _write(self, run: Any, data: dict[str, Any]) -> None:
        """Add ``data`` to the row being built, committing our previous write first when
        nobody committed it (see the module notes)."""
        now = self._wandb_step(run)
        if now is not None and self._pending_step is not None and now == self._pending_step:
            run.log({})  # commit the row holding our previous values; moves the step by one
            now += 1
        run.log(data, commit=False)
        self._pending_step = now

    def _wandb_step(self, run: Any) -> int | None:
        if not self._step_readable:
            return None
        try:
            return int(run.step)
        except Exception:  # mode="shared" runs cannot tell their step
            self._step_readable = False
            logger.info(
                "gradwatch: this W&B run does not report its step; gradwatch writes with "
                "commit=False only (values logged while you log nothing may be overwritten)."
            )
            return None

    def _finish(self, run: Any, summary: Sequence[SummaryRow]) -> None:
        if getattr(run, "_is_finished", False):
            text = (
                "gradwatch: the W&B run was finished before the watcher was closed: the "
                "findings table and summary were not written. Call watcher.close() before "
                "run.finish()."
            )
            warn_user(text)
            return
        data: dict[str, Any] = {}
        if self._latest is not None and self._charted_step != self._latest.step:
            data.update(self._chart(self._latest))
        if self.findings_table:
            data[f"{self.prefix}/findings_table"] = self._findings_table()
        if data:
            self._write(run, data)
        run.summary.update(self._summary_entries(summary))

    def _fail(self, error: BaseException) -> None:
        if self.disabled is not None:
            return
        self.disabled = f"{type(error).__name__}: {error}"
        text = (
            "gradwatch: sending to W&B failed, so the W&B reporter is now off; training and "
            f"the other reporters continue. ({self.disabled})"
        )
        logger.error(text, exc_info=error)
        warnings.warn(text, GradwatchWarning, stacklevel=3)

    # -- alerts ----------------------------------------------------------------------------

    def _remember(self, findings: Sequence[Finding]) -> None:
        for finding in findings:
            if finding.status in _ANNOUNCING:
                self._counts[finding.code] = self._counts.get(finding.code, 0) + 1
            if finding.status == "new":
                self._active[finding.code] = self._active.get(finding.code, 0) + 1
            elif finding.status == "resolved" and self._active.get(finding.code):
                self._active[finding.code] -= 1
            if len(self._findings) < _TABLE_LIMIT:
                self._findings.append(finding)

    def _maybe_alert(self, run: Any, finding: Finding) -> None:
        if self.alert_severity is None:
            return
        floor = severity_rank(self.alert_severity)
        code = finding.code
        if finding.status == "resolved":
            if self.alert_on_resolved and code in self._alerted:
                title = f"{finding.title} resolved"
                self._alert(run, title, alert_text(finding), "INFO")
            self._alerted.pop(code, None)
            return
        rank = severity_rank(finding.severity)
        if rank < floor:
            return
        before = self._alerted.get(code)
        if finding.status == "new":
            pass
        elif finding.status == "worse":
            if not self.alert_on_worse or (before is not None and rank <= severity_rank(before)):
                return
        else:  # reminder: announced already, the run page shows it persists
            return
        if before is None or rank > severity_rank(before):
            self._alerted[code] = finding.severity
        self._alert(run, finding.title, alert_text(finding), ALERT_LEVELS[finding.severity])

    def _alert(self, run: Any, title: str, text: str, level: str) -> None:
        run.alert(
            title=title[:_TITLE_LIMIT],
            text=text,
            level=level,
            wait_duration=self.alert_wait_duration,
        )
        self.alerts_sent += 1

    # -- chart, table, summary -------------------------------------------------------------

    def _chart_due(self, findings: Sequence[Finding]) -> bool:
        if self.chart_every is None:
            return False
        if self._monitored % self.chart_every == 0:
            return True
        return any(f.status in ("new", "worse") for f in findings)

    def _chart(self, stats: StepStats) -> dict[str, Any]:
        """The gradient-flow chart: log10 gradient RMS by depth, one line per charted step."""
        if self.chart_every is None:
            return {}
        layers = chart_layers(stats, self.max_layers or 10**9)
        if not layers:
            return {}
        self._charts.append((stats.step, layers))
        del self._charts[: -self.chart_history]
        self._charted_step = stats.step
        rows = []
        for step, charted in self._charts:
            for depth, layer in enumerate(charted):
                rms = layer.grad_rms
                log10 = math.log10(rms) if rms and math.isfinite(rms) and rms > 0 else None
                finite = rms if rms is not None and math.isfinite(rms) else None
                rows.append([f"step {step}", depth, layer.name or "root", finite, log10])
        table = self._wandb.Table(
            columns=["step", "depth", "layer", "grad_rms", "log10_grad_rms"], data=rows
        )
        chart = self._wandb.plot.line(
            table,
            "depth",
            "log10_grad_rms",
            stroke="step",
            title="gradient flow: log10 gradient RMS by depth (input side first)",
        )
        return {f"{self.prefix}/gradient_flow": chart}

    def _findings_table(self) -> Any:
        columns = [
            "step",
            "code",
            "rule",
            "severity",
            "status",
            "layers",
            "message",
            "hint",
            "evidence",
        ]
        rows = [
            [
                f.step,
                f.code,
                f.rule,
                f.severity,
                f.status,
                ", ".join(n or "<root>" for n in f.layers),
                f.message,
                f.hint,
                evidence_text(f),
            ]
            for f in self._findings
        ]
        return self._wandb.Table(columns=columns, data=rows)

    def _summary_entries(self, summary: Sequence[SummaryRow]) -> dict[str, Any]:
        p = self.prefix
        out: dict[str, Any] = {
            f"{p}/problems": len(summary),
            f"{p}/active_problems": sum(1 for row in summary if row.status == "active"),
        }
        by_code: dict[str, list[SummaryRow]] = {}
        for row in summary:
            by_code.setdefault(row.code, []).append(row)
        for code, rows in sorted(by_code.items()):
            out[f"{p}/{code}/count"] = len(rows)
            out[f"{p}/{code}/first_step"] = min(row.first_step for row in rows)
            out[f"{p}/{code}/rule"] = rows[0].rule
            out[f"{p}/{code}/status"] = (
                "active" if any(row.status == "active" for row in rows) else "resolved"
            )
        return out


def alert_text(finding: Finding) -> str:
    """The body of a W&B alert: what, where (step, layers), the numbers, and the fix."""
    lines = []
    if finding.status == "worse":
        lines.append(f"Worse than when first reported (now {finding.severity}).")
    lines.append(finding.message)
    lines.append(f"Step: {finding.step}")
    fields = finding_fields(finding, _SHOWN_LAYERS)
    lines.extend(f"{label.capitalize()}: {text}" for label, text in fields)
    text = "\n".join(lines)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def _first_to_last_ratio(stats: StepStats) -> float | None:
    layers = [s for s in stats.by_depth(with_gradient=True) if s.grad_rms is not None]
    if len(layers) < 2:
        return None
    first, last = layers[0].grad_rms, layers[-1].grad_rms
    if not (math.isfinite(first) and math.isfinite(last)) or last <= 0:
        return None
    return first / last


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "WandbReporter needs the wandb package: pip install 'gradwatch[wandb]' "
            "(or pip install wandb)"
        ) from error
    return wandb


__all__ = ["ALERT_LEVELS", "DEFAULT_STATS", "LAYER_STATS", "WandbReporter", "alert_text"]
