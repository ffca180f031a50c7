"""gradwatch for PyTorch Lightning: one callback, nothing else in the training code changes.

>>> import lightning as L
>>> from gradwatch.integrations.lightning import GradWatchCallback
>>> trainer = L.Trainer(callbacks=[GradWatchCallback()], accelerator="cpu",
...                     logger=False, enable_checkpointing=False)  # doctest: +SKIP

What it does during ``trainer.fit``:

- measures in ``on_before_optimizer_step``: gradients are final there (accumulated over
  ``accumulate_grad_batches``, unscaled by AMP) and not yet clipped. Validation, test and
  predict loops are never measured (they run without gradients);
- sends per-layer statistics, the global gradient norm and finding counts to every
  attached Lightning logger (CSV, TensorBoard, W&B, ...) under ``gradwatch/`` keys, at
  the steps it measures, never to the progress bar;
- announces findings on global rank 0 only: in the terminal (above the progress bar),
  on the ``logging`` logger "gradwatch", and as W&B alerts when a ``WandbLogger`` is
  attached; every rank keeps them in :attr:`GradWatchCallback.findings`;
- can stop training (``stop_on=``), and saves its rule state in checkpoints so that a
  resumed run does not announce the same problems again.

Distributed training: the watcher runs on every rank, because activation statistics
(ReLU activity, saturation) and FSDP2 gradient shards are combined across ranks before
the rules run; only rank 0 reports.

Manual optimization (``automatic_optimization = False``): Lightning calls
``on_before_optimizer_step`` inside each ``opt.step()`` of an optimizer returned by
``self.optimizers()``, so gradwatch measures there, labelled with ``trainer.global_step``,
which counts the steps of every optimizer. With several optimizers (a GAN) a monitored
step sees all gradients as they are at that moment: the stepping optimizer's fresh ones
and the others' from their last backward. Use ``every_n_steps`` that is not a multiple
of the number of optimizers to alternate which optimizer's step is measured, or
``layers=`` to watch one sub-network. Gradients clipped by hand before ``opt.step()``
are seen clipped.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

import gradwatch
from gradwatch.findings import SEVERITIES, Finding, severity_rank
from gradwatch.guard import GradwatchWarning, Guard
from gradwatch.reporters import Reporter, default_reporters
from gradwatch.reporters.metrics import (
    DEFAULT_STATS,
    LAYER_STATS,
    LayerSelection,
    check_stats,
    global_metrics,
)
from gradwatch.rules import Rule, resolve_rules, rule_matches
from gradwatch.stats import StepStats
from gradwatch.validation import deferred_option, whole_number

logger = logging.getLogger("gradwatch")

#: Per-layer statistics that ``log_stats=`` may name (fields of :class:`LayerStats`, plus
#: ``active_fraction``: the share of a ReLU layer's units active in the step's batch).
LOGGABLE_STATS = LAYER_STATS
DEFAULT_LOG_STATS = DEFAULT_STATS
_ACTIVE = ("new", "worse", "reminder")  # statuses that announce a problem (not "resolved")


class GradWatchCallback(Callback):
    """Watch the LightningModule's gradients while it trains; report and log what goes wrong.

    Args:
        every_n_steps: measure every n-th optimizer step (``trainer.global_step % n == 0``).
            Default: the trainer's ``log_every_n_steps``.
        rules, select, ignore, thresholds: choose and tune the rules, as in
            :func:`gradwatch.watch` (``select=["GW1"]``, ``ignore=["dead-units"]``,
            ``thresholds={"vanishing-gradient": {"ratio": 1e-4}}``).
        layers, exclude: glob patterns on module names to watch only part of the model.
        stop_on: stop training when a finding matches: a severity (``"error"``: that
            severity or worse), rule codes, code prefixes or slugs (``["GW103"]``), or a
            list mixing them. ``None`` (default) never stops.
        log_stats: per-layer statistics sent to the loggers (names from
            :data:`LOGGABLE_STATS`); ``True`` sends the gradient norm and RMS, and the
            active/saturated share of ReLU and sigmoid/tanh layers; ``False`` sends
            nothing to the loggers (findings are still reported).
        log_layers: at most this many layers get per-layer keys (spread evenly in
            depth, first and last included); ``None`` logs every layer.
        reporters: where findings go on rank 0. Default: the terminal, the ``logging``
            logger "gradwatch", and W&B alerts when a ``WandbLogger`` is attached.
            ``[]`` silences them (``callback.findings`` still fills).
        history, detail_every, activations, deferred: passed to :func:`gradwatch.watch`
            (its defaults when not given). With ``deferred`` (on CUDA by default) each
            monitored step's statistics are read at the next one; they are still logged
            at the step they belong to.

    Example (runs in a few seconds on a CPU):

    >>> import torch, lightning as L
    >>> class Net(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                                        torch.nn.Linear(16, 1))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    >>> watch = GradWatchCallback(every_n_steps=2, reporters=[])
    >>> trainer = L.Trainer(max_steps=6, accelerator="cpu", callbacks=[watch], logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))  # doctest: +SKIP
    >>> watch.watcher.latest.step, watch.findings  # doctest: +SKIP
    (4, [])
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        rules: Sequence[Rule] | None = None,
        select: Iterable[str] | None = None,
        ignore: Iterable[str] | None = None,
        thresholds: Mapping[str, Mapping[str, float]] | None = None,
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        stop_on: str | Iterable[str] | None = None,
        log_stats: bool | Sequence[str] = True,
        log_layers: int | None = 50,
        reporters: Sequence[Reporter] | None = None,
        history: int | None = None,
        detail_every: int | None = None,
        activations: bool = True,
        deferred: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if every_n_steps is not None:
            whole_number("every_n_steps", every_n_steps)
        for name, value in (("detail_every", detail_every), ("history", history)):
            if value is not None:
                whole_number(name, value)
        if log_layers is not None:
            whole_number("log_layers", log_layers)
        deferred_option(deferred)
        select = list(select) if select is not None else None
        ignore = list(ignore) if ignore is not None else None
        chosen = resolve_rules(rules, select=select, ignore=ignore, thresholds=thresholds)
        if reporters is not None:
            reporters = list(reporters)
            for reporter in reporters:
                if not callable(getattr(reporter, "report", None)):
                    raise ValueError(
                        f"reporter {reporter!r} has no report(stats, findings) method; "
                        "subclass gradwatch.Reporter"
                    )
        self.every_n_steps = every_n_steps
        self.stop_on = StopCondition.parse(stop_on, chosen)
        self.log_stats = _parse_log_stats(log_stats)
        self.log_layers = log_layers
        self.reporters = reporters
        self._watch_options: dict[str, Any] = {
            "rules": rules,
            "select": select,
            "ignore": ignore,
            "thresholds": thresholds,
            "layers": layers,
            "exclude": exclude,
            "activations": activations,
            "deferred": deferred,
        }
        # Left out when not given: the watcher's own defaults apply.
        if history is not None:
            self._watch_options["history"] = history
        if detail_every is not None:
            self._watch_options["detail_every"] = detail_every
        self._watcher: gradwatch.Watcher | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._guard = Guard()
        self._logger_steps: dict[int, int] = {}
        self._unchecked: list[Finding] = []  # new findings not yet judged by stop_on
        #: Why this callback stopped training (``None`` while it has not).
        self.stop_reason: str | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def watcher(self) -> gradwatch.Watcher | None:
        """The watcher of the current (or last) fit; ``None`` before ``trainer.fit``."""
        return self._watcher

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far (on every rank: the rules see the same combined statistics)."""
        return self._watcher.findings if self._watcher is not None else []

    @property
    def state_key(self) -> str:
        return "GradWatchCallback"

    def state_dict(self) -> dict[str, Any]:
        """Rule state and counters, saved in Lightning checkpoints."""
        if self._watcher is not None:
            state = self._guard.call("checkpoint", self._watcher.state_dict, default=None)
            if state is not None:
                return {"watcher": state}
        if self._pending_state is not None:
            return dict(self._pending_state)
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rule state of a checkpoint: findings already announced stay quiet."""
        if not state_dict.get("watcher"):
            return
        self._pending_state = dict(state_dict)
        if self._watcher is not None and not self._watcher.closed:
            self._apply_pending_state()

    # -- Lightning hooks -------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup(): the strategy has wrapped (DDP) or sharded (FSDP2) the
        # module by now, so the watcher holds the parameters that really get gradients.
        previous = self._watcher
        if previous is not None:
            previous.close()
            if self._pending_state is None and previous.module is pl_module:
                # fit() again on the same module: continue, as a resume would.
                self._pending_state = self._guard.call(
                    "checkpoint", lambda: {"watcher": previous.state_dict()}, default=None
                )
        self._watcher = None
        self._logger_steps.clear()
        self._unchecked.clear()
        self.stop_reason = None
        watcher: gradwatch.Watcher | None = None
        try:
            watcher = self._create_watcher(trainer, pl_module)
        except ValueError:
            raise  # a configuration mistake (layers= matching nothing): say it plainly
        except Exception as error:
            self._guard.fail("watcher", error)
        # Every rank must watch or none: a rank without a watcher would leave the others
        # waiting in the statistics' collectives.
        everyone = trainer.strategy.reduce_boolean_decision(watcher is not None, all=True)
        if watcher is not None and not everyone:
            watcher.close()
            watcher = None
            logger.error("gradwatch: the watcher failed on another rank; watching is off.")
        self._watcher = watcher
        if watcher is not None and self._pending_state is not None:
            self._apply_pending_state()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        watcher = self._watcher
        if watcher is None or watcher.closed:
            return
        label = int(trainer.global_step)
        monitored = label % watcher.every_n_steps == 0
        if monitored:
            self._note_logger_step(label, trainer)
        # Never raises; makes the same collectives on every rank.
        new = watcher.step(step=label, optimizer=optimizer)
        if self.stop_on is not None:
            self._unchecked.extend(new)
            if monitored:
                self._decide_stop(trainer, label)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the loggers are finalized, so that statistics still in flight get logged.
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # -- internals -------------------------------------------------------------------------

    def _create_watcher(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> gradwatch.Watcher:
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        options = dict(self._watch_options)
        if getattr(pl_module, "_compiler_ctx", None):
            # Lightning compiled forward/training_step in place (trainer.fit(torch.compile(m))).
            # Forward hooks added now would be ignored or force recompiles: keep gradient
            # statistics only (dead units still show in weight-gradient rows).
            options["activations"] = False
            logger.info(
                "gradwatch: the LightningModule is torch.compile'd; activation statistics "
                "are off, gradient statistics continue."
            )
        _warn_unsupported_strategy(trainer)
        reporters: list[Reporter] = []
        if trainer.is_global_zero:
            reporters = self._rank_zero_reporters(trainer)
        return gradwatch.watch(pl_module, every_n_steps=every, reporters=reporters, **options)

    def _rank_zero_reporters(self, trainer: pl.Trainer) -> list[Reporter]:
        if self.reporters is not None:
            chosen = list(self.reporters)
        else:
            chosen = list(default_reporters())
            chosen.extend(self._guard.call("wandb alerts", _wandb_reporters, trainer, default=[]))
        if self.log_stats:
            chosen.append(
                LightningLoggerReporter(
                    trainer,
                    stats=self.log_stats,
                    max_layers=self.log_layers,
                    step_of=self._logger_step,
                    counts=self._finding_counts,
                )
            )
        return chosen

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if self._watcher is None or not state:
            return
        load = self._watcher.load_state_dict
        self._guard.call("checkpoint", load, state["watcher"], default=None)

    def _note_logger_step(self, label: int, trainer: pl.Trainer) -> None:
        """Remember Lightning's logging step for this monitored step: loggers plot against
        it, and on a GPU the statistics are read one monitored step later."""
        epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        step = getattr(epoch_loop, "_batches_that_stepped", None)
        self._logger_steps[label] = int(step if step is not None else label)
        if len(self._logger_steps) > 8:
            del self._logger_steps[min(self._logger_steps)]

    def _logger_step(self, label: int) -> int:
        return self._logger_steps.get(label, label)

    def _finding_counts(self) -> tuple[dict[str, int], int]:
        watcher = self._watcher
        if watcher is None:
            return {}, 0
        counts = Counter(f.code for f in watcher.findings if f.status in _ACTIVE)
        codes = {rule.code: counts.get(rule.code, 0) for rule in watcher.rules}
        codes.update(counts)
        active = sum(1 for row in watcher.summary() if row.status == "active")
        return codes, active

    def _decide_stop(self, trainer: pl.Trainer, label: int) -> None:
        stop_on = self.stop_on
        assert stop_on is not None
        matched = self._guard.call("stop_on", stop_on.first_match, self._unchecked, default=None)
        self._unchecked.clear()
        # Every rank asks at the same monitored steps, so this collective cannot hang; a
        # match on any rank stops all of them.
        try:
            stop = trainer.strategy.reduce_boolean_decision(matched is not None, all=False)
        except Exception as error:
            self._guard.fail("stop_on", error)
            self.stop_on = None
            return
        if not stop:
            return
        trainer.should_stop = True
        if matched is not None:
            reason = (
                f"gradwatch stopped training at step {label} (stop_on={stop_on}): "
                f"{matched.title} [{matched.severity}] {matched.message}"
            )
        else:
            reason = f"gradwatch stopped training at step {label}: stop_on matched on another rank"
        self.stop_reason = reason
        if trainer.is_global_zero:
            logger.error(reason)
            warnings.warn(reason, GradwatchWarning, stacklevel=2)

    def _close(self) -> None:
        if self._watcher is not None and not self._watcher.closed:
            self._watcher.close()


class StopCondition:
    """Which findings stop training: a minimum severity and/or codes, prefixes or slugs.

    >>> from gradwatch.rules import builtin_rules
    >>> StopCondition.parse(["error", "GW104"], builtin_rules())
    StopCondition(severity='error', rules=('GW104',))
    """

    def __init__(self, severity: str | None, rules: tuple[str, ...]) -> None:
        self.severity = severity
        self.rules = rules

    @classmethod
    def parse(
        cls, value: str | Iterable[str] | None, rules: Sequence[Rule]
    ) -> StopCondition | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else list(value)
        if not items or not all(isinstance(item, str) and item.strip() for item in items):
            raise ValueError(
                f"stop_on must be a severity ({', '.join(SEVERITIES)}), a rule code or slug, "
                f"or a list of them; got {value!r}"
            )
        severities = [i.strip().lower() for i in items if i.strip().lower() in SEVERITIES]
        patterns = [i.strip() for i in items if i.strip().lower() not in SEVERITIES]
        for pattern in patterns:
            if not any(rule_matches(rule.code, rule.slug, pattern) for rule in rules):
                known = ", ".join(f"{r.code} {r.slug}" for r in rules)
                raise ValueError(
                    f"stop_on={pattern!r} is neither a severity ({', '.join(SEVERITIES)}) nor "
                    f"a code, code prefix or slug of a watched rule ({known})"
                )
        lowest = min(severities, key=severity_rank) if severities else None
        return cls(lowest, tuple(patterns))

    def matches(self, finding: Finding) -> bool:
        if finding.status not in _ACTIVE:
            return False
        if self.severity is not None and severity_rank(finding.severity) >= severity_rank(
            self.severity
        ):
            return True
        return any(rule_matches(finding.code, finding.rule, p) for p in self.rules)

    def first_match(self, findings: Sequence[Finding]) -> Finding | None:
        return next((f for f in findings if self.matches(f)), None)

    def __str__(self) -> str:
        parts = ([self.severity] if self.severity else []) + list(self.rules)
        return parts[0] if len(parts) == 1 else repr(parts)

    def __repr__(self) -> str:
        return f"StopCondition(severity={self.severity!r}, rules={self.rules!r})"


class LightningLoggerReporter(Reporter):
    """Sends each monitored step's statistics to the trainer's loggers (rank 0 only).

    Keys: ``gradwatch/<stat>/<layer>`` per layer, ``gradwatch/global_grad_norm``,
    ``gradwatch/global_param_norm``, ``gradwatch/findings/<code>`` (findings announced so
    far, per rule) and ``gradwatch/active_findings`` (problems not yet resolved).
    """

    name = "lightning-loggers"

    def __init__(
        self,
        trainer: pl.Trainer,
        *,
        stats: Sequence[str] = DEFAULT_LOG_STATS,
        max_layers: int | None = 50,
        step_of: Callable[[int], int] | None = None,
        counts: Callable[[], tuple[dict[str, int], int]] | None = None,
    ) -> None:
        self.trainer = trainer
        self.stats = tuple(stats)
        self.max_layers = max_layers
        self.step_of = step_of or (lambda label: label)
        self.counts = counts
        self._layers = LayerSelection(self.stats, max_layers)
        self._failed: set[int] = set()  # loggers that raised

    def metrics(self, stats: StepStats) -> dict[str, float]:
        """The flat ``{key: number}`` dictionary logged for one monitored step."""
        out = global_metrics(stats, "gradwatch")
        out.update(self._layers.metrics(stats, "gradwatch"))
        if self.counts is not None:
            codes, active = self.counts()
            for code, count in sorted(codes.items()):
                out[f"gradwatch/findings/{code}"] = float(count)
            out["gradwatch/active_findings"] = float(active)
        return out

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        loggers = [
            lg
            for lg in getattr(self.trainer, "loggers", None) or []
            if id(lg) not in self._failed
        ]
        if not loggers:
            return
        metrics = self.metrics(stats)
        step = self.step_of(stats.step)
        for lightning_logger in loggers:
            try:
                lightning_logger.log_metrics(metrics, step=step)
            except Exception as error:  # one broken logger must not silence the others
                self._failed.add(id(lightning_logger))
                logger.error(
                    "gradwatch: %s failed to log statistics and gets no more of them (%s: %s)",
                    type(lightning_logger).__name__, type(error).__name__, error,
                )

    def close(self, summary: Sequence[Any]) -> None:
        self.trainer = None  # type: ignore[assignment]


def _parse_log_stats(value: bool | Sequence[str]) -> tuple[str, ...]:
    if value is True:
        return DEFAULT_LOG_STATS
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    return check_stats(tuple(value), "log_stats")


def _wandb_reporters(trainer: pl.Trainer) -> list[Reporter]:
    """Chart, alerts and summary for each attached WandbLogger (W&B is imported only then).
    The metrics themselves go through the logger, like every other logger's."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return []
    from .wandb import WandbReporter  # imports wandb

    return [WandbReporter(run=lg.experiment, metrics=False) for lg in wandb_loggers]


def _warn_unsupported_strategy(trainer: pl.Trainer) -> None:
    """Lightning's FSDPStrategy (FSDP1) flattens parameters: per-layer norms would be those
    of each rank's flat shard. FSDP2 (ModelParallelStrategy + fully_shard) is supported."""
    name = type(trainer.strategy).__name__
    if name == "FSDPStrategy":
        warnings.warn(
            "gradwatch: Lightning's FSDPStrategy (FSDP1) keeps flattened parameter shards, so "
            "per-layer statistics are not exact. Use ModelParallelStrategy with "
            "torch.distributed.fsdp.fully_shard (FSDP2), which gradwatch combines across ranks.",
            GradwatchWarning,
            stacklevel=3,
        )


__all__ = [
    "DEFAULT_LOG_STATS",
    "LOGGABLE_STATS",
    "GradWatchCallback",
    "LightningLoggerReporter",
    "StopCondition",
]
