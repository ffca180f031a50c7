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
  over the last's), ``gradwatch/findings/<code>`` (that rule's problems active
  at the step: 1 while present, 0 once resolved),
  ``gradwatch/active_findings``, and ``gradwatch/step``, the training step they belong to;
- ``gradwatch/gradient_flow``: a line chart of log10 gradient RMS against depth (input
  side first), one line per recent charted step, every ``chart_every`` monitored steps and
  whenever a finding starts: the run page shows where the signal dies;
- an alert (``run.alert``) when a finding starts: title ``"GW101 vanishing-gradient"``,
  text with the message, layers, evidence and fix, level ``WARN`` for warnings and
  ``ERROR`` for errors;
- at ``watcher.close()`` (or at ``run.finish()`` if that comes first): a
  ``gradwatch/findings_table`` table of every finding, the ``gradwatch/stats_table`` of
  values no row carried (see below; only when there are some), and ``run.summary``
  entries ``gradwatch/<code>/count``, ``gradwatch/<code>/first_step``,
  ``gradwatch/<code>/status``, ``gradwatch/problems`` and ``gradwatch/active_problems``.
  The reporter never finishes your run.

Which alerts (W&B sends them by e-mail or Slack, so only changes that need action):
``"new"`` findings at or above ``alert_severity``; ``"worse"`` ones only when the severity
rose above what was already alerted for that rule (a warning that became an error), with
``alert_on_worse=True``; ``"reminder"`` never (the problem was announced and the run page
shows it persists); ``"resolved"`` as an ``INFO`` alert titled
``"GW101 vanishing-gradient resolved"`` with ``alert_on_resolved=True``, for rules that
alerted. ``alert_wait_duration`` is passed to W&B, which holds back an alert with the
same title sent again within that many seconds.

Your rows and your steps are never touched (measured with wandb 0.31; see
``wandb_rows.py`` and the tests): gradwatch never commits a W&B row, never passes
``step=`` and never waits on the run. It adds its values to the row the run is building
(``run.log(values, commit=False)``), so they land in the next row *you* commit, and that
row stays at the step you gave it. Whatever the way you log (every step, before or after
``watcher.step()``, rarely, with ``step=`` per epoch or at any increasing steps, or not at
all), the run's rows and their ``_step`` are exactly those you would get without
gradwatch, and no row of yours is dropped. (A row of its own would move the step: your
later rows would land one step further, and a ``step=`` you log next that is not above
it would be dropped.)

Where gradwatch's values go:

- each row you commit carries gradwatch's latest values, with ``gradwatch/step``, the
  training step they describe; every ``gradwatch/...`` metric is defined with
  ``run.define_metric(key, step_metric="gradwatch/step")``, so its chart plots against the
  training step whichever row the value landed in (on a GPU the statistics are read one
  monitored step later: they land a row or more late, ``gradwatch/step`` still says
  which step they describe). The keys are defined by name, not with a ``gradwatch/*``
  glob: W&B picks among matching globs in no fixed order, and Lightning's ``WandbLogger``
  defines ``*`` (against ``trainer/global_step``), which would then win at random;
- when no row was committed since gradwatch's previous values (you log less often than
  gradwatch measures, or with ``step=`` that has not moved on yet), the new values take
  their place in the row being built and the replaced ones go to the table
  ``gradwatch/stats_table`` (one row per monitored step, same keys, at most 1,000 rows
  spread over the whole run), written at ``watcher.close()``; gradwatch says so once, as a
  warning, the first time it happens. Every monitored step's values are therefore in a
  history row or in that table;
- the last values, the chart and the closing tables are in the row being built when the
  watcher closes: your next ``run.log()`` commits them, or ``run.finish()`` does.

``run.finish()`` before ``watcher.close()``: gradwatch writes its closing tables and summary
from inside ``run.finish()`` (wandb's teardown hook; the summary then counts the findings
this reporter saw), then sends nothing more: the steps that follow cost what they cost
without W&B, and nothing raises into training. With a wandb that has no teardown hooks the
closing data is skipped, with a warning at ``watcher.close()``.

``metrics=False`` (how the Lightning and Transformers integrations use it, next to a
framework that logs its own rows): the reporter sends alerts, adds the gradient-flow chart
and, at close, the tables to the row being built, and writes summary entries. It never
commits a row, never passes ``step=``, never reads the run's step and writes no
``gradwatch/step``: the framework's next row carries the chart. Under Lightning the
training step is ``trainer.global_step``, and the callback's own logging of the metrics
goes through the ``WandbLogger``.

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
from dataclasses import dataclass
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

from .wandb_rows import (
    ThinnedRows,
    building_step,
    call_at_finish,
    is_finished_error,
    run_finished,
)

logger = logging.getLogger("gradwatch")


ALERT_LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
_ANNOUNCING = ("new", "worse", "reminder")  # statuses that say a problem is present
_TITLE_LIMIT = 63  # W&B: "must be less than 64 characters long"
_TEXT_LIMIT = 3000
_SHOWN_LAYERS = 12
_TABLE_LIMIT = 2000  # findings kept for the closing table
_RUN_FINISHED = "the W&B run is finished"
_STATS_TABLE_LIMIT = 1000  # monitored steps kept for gradwatch/stats_table (thinned beyond)


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

    The run's step belongs to you: the reporter never commits a row, never passes
    ``step=`` and never waits on the run (see the module notes). Its values join the
    next row you commit; values that no row carried are kept in ``gradwatch/stats_table``.

    With ``metrics=False`` it can sit next to a framework that logs its own rows (the
    Lightning and Transformers integrations use it so): it sends alerts, adds the
    gradient-flow chart and, at close, the findings table to the row being built with
    ``commit=False``, and writes ``run.summary`` entries. It writes no ``gradwatch/step``
    and never reads the run's step, so the framework's rows and steps stay exactly as
    they would be without it.

    If ``run.finish()`` comes before ``watcher.close()``, the reporter writes its closing
    tables and summary from inside ``run.finish()`` and sends nothing afterwards (no
    call that could wait on the finished run); nothing raises into training.

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
        # Our last step's values and the W&B step of the row they went into: if that row
        # is still being built at our next write, the next values replace them there.
        self._written: dict[str, float] | None = None
        self._written_in: int | None = None
        self._replaced = ThinnedRows(_STATS_TABLE_LIMIT)  # values no history row carried
        self._unhook_finish: Any = None
        self._run_over = False
        self._wrote_at_finish = False
        self._monitored = 0
        self._charts: list[tuple[int, list[LayerStats]]] = []
        self._charted_step: int | None = None
        self._latest: StepStats | None = None
        self._counts: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._alerted: dict[str, str] = {}  # rule code -> highest severity alerted
        self._findings: list[Finding] = []
        self._started: dict[str, tuple[int, int]] = {}  # code -> (problems, first step)
        self._rules: dict[str, str] = {}
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
        if run_finished(run):  # checked first: a finished run must cost nothing
            self._stop_after_finish()
            return
        try:
            self._setup(run)
            if self.disabled is not None:
                return
            for finding in findings:
                self._maybe_alert(run, finding)
            chart = self._chart_due(findings)
            data = self.metrics(stats) if self.log_metrics else {}
            if chart:
                data.update(self._chart(stats))
            if data:
                self._define(run, data)
                self._write(run, data, values=self.log_metrics)
        except Exception as error:  # W&B trouble must not reach training
            self._fail(error)
        finally:
            self._monitored += 1

    def close(self, summary: Sequence[SummaryRow]) -> None:
        if self._closed:
            return
        self._closed = True
        self._release_finish_hook()
        run = self._run
        if run is None or not self._ready:
            return
        if self._run_over or run_finished(run):
            self._stop_after_finish()
            if self.disabled == _RUN_FINISHED and not self._wrote_at_finish:
                warn_user(
                    "gradwatch: the W&B run was finished before the watcher was closed, and "
                    "this wandb version gives no way to write at run.finish(): the findings "
                    "table and summary were not written. Call watcher.close() before "
                    "run.finish()."
                )
            return
        if self.disabled is not None:
            return
        try:
            self._write_closing(run, self._summary_entries(_tallies_from_rows(summary)))
        except Exception as error:  # the run may have failed or finished
            self._fail(error)

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
        for code in sorted(self._counts):  # every rule announced so far; 0 once resolved
            out[f"{p}/findings/{code}"] = self._active.get(code, 0)
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
        self._unhook_finish = call_at_finish(run, self._at_run_finish)
        if self.log_metrics:
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

    def _write(self, run: Any, data: dict[str, Any], *, values: bool) -> None:
        """Add ``data`` to the row the run is building; never commit (module notes).

        ``values``: ``data`` holds a monitored step's metrics. If our previous step's
        metrics are still in the row being built (no row committed since), ``data``
        replaces them there: keep them in the stats table, and blank the keys that
        ``data`` lacks so that the row holds one step's values only.
        """
        if not values:
            run.log(data, commit=False)
            return
        now = building_step(run)
        previous = self._written
        if previous is not None and (now is None or now == self._written_in):
            self._replaced.add(previous)
            for key in previous.keys() - data.keys():
                data[key] = None
            if self._replaced.seen == 1:
                self._say_replaced(previous, data)
        run.log(data, commit=False)
        self._written = {k: v for k, v in data.items() if isinstance(v, (int, float))}
        self._written_in = now

    def _say_replaced(self, previous: dict[str, Any], data: dict[str, Any]) -> None:
        step_key = f"{self.prefix}/step"
        text = (
            f"gradwatch: no W&B row was committed between monitored steps "
            f"{previous.get(step_key)} and {data.get(step_key)} (W&B commits a row when you "
            "call run.log() without step=, or when your step= moves on). gradwatch never "
            "commits rows itself, as that would move your steps or make W&B drop rows you log "
            "later: each row you commit carries gradwatch's latest values (gradwatch/step says "
            "which training step), and values replaced before any row was committed are kept "
            f"in the table {self.prefix}/stats_table, written at watcher.close()."
        )
        warn_user(text, stacklevel=5)

    def _write_closing(self, run: Any, entries: dict[str, Any]) -> None:
        """The last chart, the tables (into the row being built) and the summary."""
        data: dict[str, Any] = {}
        if self._latest is not None and self._charted_step != self._latest.step:
            data.update(self._chart(self._latest))
        if self.findings_table:
            data[f"{self.prefix}/findings_table"] = self._findings_table()
        if len(self._replaced):
            data[f"{self.prefix}/stats_table"] = self._stats_table()
        if data:
            self._write(run, data, values=False)
        run.summary.update(entries)

    def _at_run_finish(self) -> None:
        """Inside ``run.finish()`` (wandb's teardown hook): write what close() would have
        written, then stop. Must never raise: it would raise out of ``run.finish()``."""
        try:
            run = self._run
            if self._closed or self.disabled is not None or run is None:
                return
            self._write_closing(run, self._summary_entries(self._tallies_seen()))
            self._wrote_at_finish = True
            logger.info(
                "gradwatch: the W&B run finished before the watcher was closed; gradwatch "
                "wrote its tables and summary at run.finish() and sends nothing more to W&B."
            )
        except Exception as error:
            logger.error("gradwatch: writing to W&B at run.finish() failed", exc_info=error)
        finally:
            # wandb is looping over its hooks right now: forget ours, do not remove it.
            self._unhook_finish = None
            self._stop_after_finish()

    def _stop_after_finish(self) -> None:
        self._run_over = True
        if self.disabled is None:
            self.disabled = _RUN_FINISHED
        self._release_finish_hook()

    def _release_finish_hook(self) -> None:
        remove, self._unhook_finish = self._unhook_finish, None
        if remove is not None:
            try:
                remove()
            except Exception:  # the run may be tearing down; the hook checks _closed anyway
                pass

    def _fail(self, error: BaseException) -> None:
        if self.disabled is not None:
            return
        if is_finished_error(error) or (self._run is not None and run_finished(self._run)):
            self._stop_after_finish()  # finished under our feet: not a failure
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
                count, first = self._started.get(finding.code, (0, finding.step))
                self._started[finding.code] = (count + 1, min(first, finding.step))
                self._rules[finding.code] = finding.rule
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

    def _stats_table(self) -> Any:
        """Monitored steps whose values no history row carried, one row each."""
        columns = self._replaced.columns(first=f"{self.prefix}/step")
        rows = [[row.get(c) for c in columns] for row in self._replaced.rows]
        return self._wandb.Table(columns=columns, data=rows)

    def _tallies_seen(self) -> dict[str, ProblemTally]:
        """Per rule code, the problems this reporter saw start (for ``run.finish()``
        before ``watcher.close()``, when the watcher's own summary is not at hand)."""
        out = {}
        for code, (count, first) in self._started.items():
            active = self._active.get(code, 0)
            out[code] = ProblemTally(self._rules[code], count, first, active > 0, active)
        return out

    def _summary_entries(self, tallies: dict[str, ProblemTally]) -> dict[str, Any]:
        p = self.prefix
        out: dict[str, Any] = {
            f"{p}/problems": sum(t.count for t in tallies.values()),
            f"{p}/active_problems": sum(t.active_count for t in tallies.values()),
        }
        for code, tally in sorted(tallies.items()):
            out[f"{p}/{code}/count"] = tally.count
            out[f"{p}/{code}/first_step"] = tally.first_step
            out[f"{p}/{code}/rule"] = tally.rule
            out[f"{p}/{code}/status"] = "active" if tally.active else "resolved"
        return out


@dataclass(frozen=True)
class ProblemTally:
    """What the run summary says about one rule code."""

    rule: str
    count: int  # problems announced (episodes)
    first_step: int
    active: bool
    active_count: int = 0


def _tallies_from_rows(summary: Sequence[SummaryRow]) -> dict[str, ProblemTally]:
    by_code: dict[str, list[SummaryRow]] = {}
    for row in summary:
        by_code.setdefault(row.code, []).append(row)
    out = {}
    for code, rows in by_code.items():
        active = sum(1 for row in rows if row.status == "active")
        first = min(row.first_step for row in rows)
        out[code] = ProblemTally(rows[0].rule, len(rows), first, active > 0, active)
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
    # Imported when a reporter is made, not with this module: importing wandb takes a
    # second, and the Lightning callback imports this module only for a WandbLogger.
    from ._requires import require

    return require("wandb", extra="wandb", integration="gradwatch.integrations.wandb")


__all__ = ["ALERT_LEVELS", "DEFAULT_STATS", "LAYER_STATS", "WandbReporter", "alert_text"]
