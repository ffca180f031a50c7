"""gradwatch for PyTorch Lightning: one callback, nothing else in the training code changes.

>>> import lightning as L
>>> from gradwatch.integrations.lightning import GradWatchCallback
>>> trainer = L.Trainer(callbacks=[GradWatchCallback()], accelerator="cpu",
...                     logger=False, enable_checkpointing=False)  # doctest: +SKIP

What it does during ``trainer.fit``:

- measures in ``on_before_optimizer_step``: gradients are final there (accumulated over
  ``accumulate_grad_batches``, unscaled by AMP) and not yet clipped. It measures every
  ``every_n_steps`` optimizer steps (15 by default, as :func:`gradwatch.watch`), so a
  problem present from the start is announced within 45 steps, and also at every step
  after which Lightning writes its logs (``log_every_n_steps``). Validation, test and
  predict loops are never measured (they run without gradients);
- adds per-layer statistics, the global gradient norm and active problems per rule under
  ``gradwatch/`` keys to the rows Lightning logs (``self.log`` from the callback, never to
  the progress bar), so they share the step and epoch of your own metrics in every
  attached logger (CSV, TensorBoard, W&B, ...). Each row holds the statistics of the step
  it is written at (with ``deferred=True``, the default on CUDA, of the newest step read
  by then: at most ``every_n_steps`` earlier). With ``log_every_n_steps=1`` every step is
  measured: to keep the overhead low, log less often or pass ``log_stats=False``;
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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ._requires import require

require("lightning", extra="lightning", integration="gradwatch.integrations.lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.findings import Finding  # noqa: E402
from gradwatch.guard import GradwatchWarning, Guard  # noqa: E402
from gradwatch.keywords import suggest_keywords  # noqa: E402
from gradwatch.reporters.base import Reporter  # noqa: E402
from gradwatch.rules import Rule  # noqa: E402

from ._callback import (  # noqa: E402
    DEFAULT_LOG_STATS,
    LOGGABLE_STATS,
    CallbackOptions,
    MetricsBuffer,
    StopCondition,
    finding_counts,
    step_watcher,
)

logger = logging.getLogger("gradwatch")


class GradWatchCallback(Callback):
    """Watch the LightningModule's gradients while it trains; report and log what goes wrong.

    Args:
        every_n_steps: measure every n-th optimizer step (``trainer.global_step % n == 0``);
            default 15. Steps after which Lightning logs are measured as well.
        rules, select, ignore, thresholds: choose and tune the rules, as in
            :func:`gradwatch.watch` (``select=["GW1"]``, ``ignore=["dead-units"]``,
            ``thresholds={"vanishing-gradient": {"ratio": 1e-4}}``).
        layers, exclude: glob patterns on module names to watch only part of the model.
        stop_on: stop training when a finding matches: a severity (``"error"``: that
            severity or worse), rule codes, code prefixes or slugs (``["GW103"]``), or a
            list mixing them. ``None`` (default) never stops.
        log_stats: per-layer statistics added to Lightning's log rows (names from
            :data:`LOGGABLE_STATS`); ``True`` sends the gradient norm and RMS, and the
            active/saturated share of ReLU and sigmoid/tanh layers; ``False`` sends
            nothing to the loggers (findings are still reported).
        log_layers: at most this many layers get per-layer keys (spread evenly in
            depth, first and last included); ``None`` logs every layer.
        reporters: where findings go on rank 0. Default: the terminal, the ``logging``
            logger "gradwatch", and W&B alerts when a ``WandbLogger`` is attached.
            ``[]`` silences them (``callback.findings`` still fills).
        history, detail_every, activations, deferred, sentinel: passed to
            :func:`gradwatch.watch` (``sentinel=False``: no every-step NaN/jump check)
            (its defaults when not given).

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

    @suggest_keywords("GradWatchCallback()")
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
        sentinel: bool = True,
    ) -> None:
        super().__init__()
        self.options = CallbackOptions(
            every_n_steps=every_n_steps,
            rules=rules,
            select=select,
            ignore=ignore,
            thresholds=thresholds,
            layers=layers,
            exclude=exclude,
            stop_on=stop_on,
            log_stats=log_stats,
            log_layers=log_layers,
            reporters=reporters,
            history=history,
            detail_every=detail_every,
            activations=activations,
            deferred=deferred,
            sentinel=sentinel,
        )
        self.stop_on: StopCondition | None = self.options.stop_on
        self._watcher: gradwatch.Watcher | None = None
        self._metrics: MetricsBuffer | None = None
        self._trainer: pl.Trainer | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._guard = Guard()
        self._unchecked: list[Finding] = []  # new findings not yet judged by stop_on
        self._now: int | None = None  # the optimizer step being measured, while it is
        self._offset = 0  # trainer.global_step minus Lightning's logging step
        self._loss: Any = None  # the loss of the step's last backward
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
        self._metrics = None
        self._trainer = trainer
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
        if watcher is None:
            return
        if self.options.log_stats and trainer.loggers:
            # Rows to fill: measure the steps they are written at too. Decided alike on
            # every rank (loggers exist on each), so every rank measures the same steps.
            watcher.also_measure = self._lightning_logs_at
        if self._pending_state is not None:
            self._apply_pending_state()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        self._loss = loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        watcher = self._watcher
        if watcher is None or watcher.closed:
            return
        label = int(trainer.global_step)
        self._offset = label - _logging_step(trainer, label)
        self._now = label
        try:
            monitored = watcher.is_monitored(label)
            # Never raises; makes the same collectives on every rank.
            new = step_watcher(
                watcher,
                label,
                optimizer=optimizer,
                scaler=getattr(trainer.precision_plugin, "scaler", None),
                loss=self._loss,
            )
        finally:
            self._now = None
            self._loss = None
        if self.stop_on is not None:
            self._unchecked.extend(new)
            if monitored:
                self._decide_stop(trainer, label)
        if self._metrics is not None and _logs_now(trainer):
            self._log_metrics(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        overrides: dict[str, Any] = {}
        if getattr(pl_module, "_compiler_ctx", None):
            # Lightning compiled forward/training_step in place (trainer.fit(torch.compile(m))).
            # Forward hooks added now would be ignored or force recompiles: keep gradient
            # statistics only (dead units still show in weight-gradient rows).
            overrides["activations"] = False
            logger.info(
                "gradwatch: the LightningModule is torch.compile'd; activation statistics "
                "are off, gradient statistics continue."
            )
        _warn_unsupported_strategy(trainer)
        reporters: list[Reporter] = []
        if trainer.is_global_zero:
            extras = lambda: self._guard.call(  # noqa: E731
                "wandb alerts", _wandb_reporters, trainer, default=[]
            )
            reporters = self.options.main_reporters(extras)
            if self.options.log_stats and trainer.loggers:
                self._metrics = MetricsBuffer(
                    stats=self.options.log_stats,
                    max_layers=self.options.log_layers,
                    counts=lambda: finding_counts(self._watcher),
                )
                reporters.append(self._metrics)
        return self.options.watch(
            pl_module, reporters=reporters, framework="lightning", **overrides
        )

    def _lightning_logs_at(self, label: int) -> bool:
        """Whether Lightning writes its logs after optimizer step ``label`` (the watcher
        asks this to measure such steps too, and to place its hooks ahead of them)."""
        trainer = self._trainer
        if trainer is None:
            return False
        if label == self._now:
            return _logs_now(trainer)
        every = trainer.log_every_n_steps
        # Ahead of time: one optimizer step per batch (manual optimization with several
        # optimizers is decided exactly when the step comes).
        return bool(every) and (label - self._offset + 1) % every == 0

    def _log_metrics(self, pl_module: pl.LightningModule) -> None:
        """Add the newest statistics to the row Lightning is about to write."""
        assert self._metrics is not None
        metrics = self._guard.call("metrics", self._metrics.take, default={})
        if not metrics:
            return
        self._guard.call(
            "logging to Lightning",
            pl_module.log_dict,
            metrics,
            on_step=True,
            on_epoch=False,
            prog_bar=False,
            logger=True,
            rank_zero_only=True,
            default=None,
        )

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if self._watcher is None or not state:
            return
        load = self._watcher.load_state_dict
        self._guard.call("checkpoint", load, state["watcher"], default=None)

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
        reason = stop_on.reason(label, matched)
        self.stop_reason = reason
        if trainer.is_global_zero:
            logger.error(reason)
            warnings.warn(reason, GradwatchWarning, stacklevel=2)

    def _close(self) -> None:
        self._trainer = None
        if self._watcher is not None and not self._watcher.closed:
            self._watcher.close()


def _logging_step(trainer: pl.Trainer, default: int) -> int:
    """Lightning's logging step (batches that stepped the optimizer), ``default`` if unknown."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(step) if step is not None else default


def _logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes its log row at the end of the current batch."""
    connector = getattr(trainer, "_logger_connector", None)
    try:
        logs = bool(connector.should_update_logs)  # type: ignore[union-attr]
    except Exception:  # Lightning moved it: the rule it implements
        every = trainer.log_every_n_steps
        logs = bool(every) and (_logging_step(trainer, 0) + 1) % every == 0
    return logs or bool(trainer.fast_dev_run)


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
    "StopCondition",
]
