"""gradwatch for the Hugging Face Transformers ``Trainer``: one callback.

>>> from transformers import Trainer
>>> from gradwatch.integrations.transformers import GradWatchCallback
>>> trainer = Trainer(model=model, args=args, train_dataset=data,
...                   callbacks=[GradWatchCallback()])                 # doctest: +SKIP
>>> trainer.train()                                                    # doctest: +SKIP

What it does during ``trainer.train()``:

- measures once per optimizer step that is monitored: every ``every_n_steps`` steps (15 by
  default, as :func:`gradwatch.watch`), the first step, and every step the Trainer logs
  (``logging_steps``). Steps are numbered as the Trainer numbers them in its logs
  (``state.global_step`` after the step: 1, 2, ...).
- which gradients: the final ones of the step, before the Trainer clips them. gradwatch
  reads them at the end of the backward pass that completes an accumulation window
  (``gradient_accumulation_steps``), after DDP has averaged them (or FSDP2 has
  reduce-scattered them) and before ``max_grad_norm`` clipping: the gradients the
  Trainer's own ``grad_norm`` in the same log row describes, and a NaN is traced to the
  layer it starts in (clipping would spread it to every layer). The earlier
  micro-batches' backward passes are not measured. With fp16 mixed
  precision the statistics are of unscaled gradients where the installed gradwatch can
  unscale them itself; otherwise gradwatch measures in ``on_pre_optimizer_step``, after
  the Trainer has unscaled and clipped them, and says so once. bf16 has no scaling.
- metrics: ``gradwatch/*`` keys (the same names and choice as under Lightning: per-layer
  ``grad_norm``, ``grad_rms``, active/saturated share, ``global_grad_norm``, finding
  counts) are added to the Trainer's own training log rows, so they appear in
  ``trainer.state.log_history`` next to ``loss`` and ``grad_norm`` at the same ``step`` and
  reach every ``report_to`` integration (TensorBoard, W&B, MLflow, ...) through the
  Trainer's logging. A row holds the statistics of the step it is written at.
- findings are announced on the main process only: in the terminal, on the ``logging``
  logger "gradwatch", and as W&B alerts when ``report_to`` includes ``"wandb"``; every
  process keeps them in :attr:`GradWatchCallback.findings`;
- ``stop_on=`` stops training on every rank (``control.should_training_stop``);
- the rule state is saved in each checkpoint (``trainer_state.json``), so
  ``trainer.train(resume_from_checkpoint=...)`` does not announce the same problems again.

Distributed training (``torchrun``, ``accelerate launch``): every process measures and the
statistics are combined across ranks before the rules run. DeepSpeed takes the gradients
into its own partitioned buffers and steps the optimizer inside ``backward()``, before any
callback runs: there gradwatch says once that gradient statistics are unavailable and
stays out of the way.

Plain Accelerate loops need no callback: call ``watcher.step()`` inside
``if accelerator.sync_gradients:``, before ``accelerator.clip_grad_norm_`` (see the README).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from ._requires import require

require("transformers", extra="transformers", integration="gradwatch.integrations.transformers")

from transformers.trainer_callback import (  # noqa: E402
    CallbackHandler,
    ExportableState,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.training_args import TrainingArguments  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.findings import Finding  # noqa: E402
from gradwatch.guard import GradwatchWarning, Guard  # noqa: E402
from gradwatch.keywords import suggest_keywords  # noqa: E402
from gradwatch.reporters.base import Reporter  # noqa: E402
from gradwatch.reporters.metrics import spread  # noqa: E402
from gradwatch.rules import Rule  # noqa: E402

from ._callback import (  # noqa: E402
    PREFIX,
    CallbackOptions,
    MetricsBuffer,
    StopCondition,
    any_rank,
    every_rank,
    finding_counts,
    step_watcher,
)

logger = logging.getLogger("gradwatch")

#: Parameters whose gradient tells that a backward pass is running (spread over the model).
_SENTINELS = 8


class GradWatchCallback(TrainerCallback, ExportableState):
    """Watch the model a ``transformers.Trainer`` trains; report and log what goes wrong.

    Args:
        every_n_steps: measure every n-th optimizer step (15 by default); the first step
            and the steps the Trainer logs are measured as well.
        rules, select, ignore, thresholds: choose and tune the rules, as in
            :func:`gradwatch.watch` (``select=["GW1"]``, ``ignore=["dead-units"]``,
            ``thresholds={"vanishing-gradient": {"ratio": 1e-4}}``).
        layers, exclude: glob patterns on module names to watch only part of the model
            (``layers=["transformer.h.*"]``).
        stop_on: stop training when a finding matches: a severity (``"error"``: that
            severity or worse), rule codes, code prefixes or slugs (``["GW103"]``), or a
            list mixing them. ``None`` (default) never stops.
        log_stats: per-layer statistics added to the Trainer's log rows; ``True``: the
            gradient norm and RMS, and the active/saturated share of ReLU and sigmoid/tanh
            layers; ``False``: none (findings are still reported).
        log_layers: at most this many layers get per-layer keys (spread evenly in depth,
            first and last included); ``None`` logs every layer.
        reporters: where findings go on the main process. Default: the terminal, the
            ``logging`` logger "gradwatch", and W&B alerts when ``report_to`` includes
            ``"wandb"``. ``[]`` silences them (``callback.findings`` still fills).
        history, detail_every, activations, deferred, sentinel: passed to
            :func:`gradwatch.watch` (``sentinel=False``: no every-step NaN/jump check).

    Example (a 30-layer sigmoid network: the gradient never reaches the first layers):

    >>> import torch
    >>> from torch import nn
    >>> from transformers import Trainer, TrainingArguments
    >>> class Deep(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         layers = [m for _ in range(30) for m in (nn.Linear(16, 16), nn.Sigmoid())]
    ...         self.net = nn.Sequential(*layers, nn.Linear(16, 4))
    ...     def forward(self, x, labels):
    ...         return {"loss": nn.functional.cross_entropy(self.net(x), labels)}
    >>> data = [{"x": torch.randn(16), "labels": i % 4} for i in range(256)]
    >>> watch = GradWatchCallback(reporters=[])
    >>> args = TrainingArguments("out", max_steps=45, report_to=[], use_cpu=True,
    ...                          save_strategy="no", disable_tqdm=True)
    >>> Trainer(model=Deep(), args=args, train_dataset=data,
    ...         callbacks=[watch]).train()                             # doctest: +SKIP
    >>> [f.code for f in watch.findings]                               # doctest: +SKIP
    ['GW101']
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
        # What trainer_state.json keeps of the options (plain values only: a checkpoint
        # restored with restore_callback_states_from_checkpoint=True rebuilds the callback
        # from them; custom rules= and reporters= objects cannot be saved there).
        self._saved_args = _plain(
            {
                "every_n_steps": every_n_steps,
                "select": select,
                "ignore": ignore,
                "thresholds": thresholds,
                "layers": layers,
                "exclude": exclude,
                "stop_on": stop_on,
                "log_stats": log_stats,
                "log_layers": log_layers,
                "history": history,
                "detail_every": detail_every,
                "activations": activations,
                "deferred": deferred,
                "sentinel": sentinel,
            }
        )
        self.stop_on: StopCondition | None = self.options.stop_on
        self._watcher: gradwatch.Watcher | None = None
        self._metrics: MetricsBuffer | None = None
        self._capture: _EndOfBackward | None = None
        self._scaler: Any = None
        self._optimizer: Any = None
        self._args: TrainingArguments | None = None
        self._state: TrainerState | None = None
        self._rows_in_front = False  # the row writer runs before report_to's callbacks
        self._measured: int | None = None  # step measured at the end of its backward
        self._new: list[Finding] = []  # new findings not yet judged by stop_on
        self._guard = Guard()
        self._main = True
        #: Rule state to continue from (a checkpoint, or an earlier ``train()``).
        self._pending_state: Mapping[str, Any] | None = None
        #: Why this callback stopped training (``None`` while it has not).
        self.stop_reason: str | None = None
        #: Why gradient statistics are unavailable in this run (DeepSpeed), else ``None``.
        self.unavailable: str | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def watcher(self) -> gradwatch.Watcher | None:
        """The watcher of the current (or last) ``train()``; ``None`` before it."""
        return self._watcher

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far (on every rank: the rules see the same combined statistics)."""
        return self._watcher.findings if self._watcher is not None else []

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in each checkpoint: the options and the rule state."""
        watcher_state = None
        if self._watcher is not None:
            watcher_state = self._guard.call("checkpoint", self._watcher.state_dict, default=None)
        if watcher_state is None and self._pending_state is not None:
            watcher_state = dict(self._pending_state)
        return {"args": dict(self._saved_args), "attributes": {"_pending_state": watcher_state}}

    # -- Trainer events --------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._put_row_writer_first()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self._put_row_writer_first()
        model = kwargs.get("model")
        optimizer = kwargs.get("optimizer")
        previous = self._watcher
        if previous is not None:
            previous.close()
            if self._pending_state is None and model is not None and previous.module is model:
                # train() again on the same model: continue, as a resume would.
                self._pending_state = self._guard.call("checkpoint", previous.state_dict,
                                                       default=None)
        if self._pending_state is None and state.global_step > 0:
            self._pending_state = _saved_state(state)  # resumed from a checkpoint
        self._watcher = None
        self._metrics = None
        self._capture = None
        self._new.clear()
        self._measured = None
        self.stop_reason = None
        self._args, self._state = args, state
        self._optimizer = optimizer
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler (fp16)
        self._main = bool(state.is_world_process_zero)

        reason = deepspeed_reason(args)
        if reason is not None:
            self.unavailable = reason
            if self._main:
                self._guard.say_once("deepspeed", reason, level=logging.WARNING)
            return
        if model is None:
            return
        watcher: gradwatch.Watcher | None = None
        try:
            watcher = self._create_watcher(model, args)
        except ValueError:
            raise  # a configuration mistake (layers= matching nothing): say it plainly
        except Exception as error:
            self._guard.fail("watcher", error)
        # Every rank must watch or none: a rank without a watcher would leave the others
        # waiting in the statistics' collectives.
        if not self._guard.call("watcher", every_rank, watcher is not None, default=False):
            if watcher is not None:
                watcher.close()
                logger.error("gradwatch: the watcher failed on another rank; watching is off.")
            return
        assert watcher is not None
        self._watcher = watcher
        watcher.also_measure = self._also_measured
        if self._pending_state is not None:
            state_dict, self._pending_state = self._pending_state, None
            self._guard.call("checkpoint", watcher.load_state_dict, state_dict, default=None)
        self._capture = self._guard.call(
            "measuring before clipping", self._end_of_backward, model, optimizer, default=None
        )

    def on_step_begin(self, args, state, control, **kwargs):
        watcher = self._watcher
        if watcher is None or watcher.closed or self._capture is None:
            return
        step = state.global_step + 1
        if watcher.is_monitored(step):
            self._capture.arm(lambda: self._measure_final(step))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        watcher = self._watcher
        if watcher is None or watcher.closed:
            return
        step = state.global_step + 1
        if self._capture is not None:
            self._capture.disarm()
        if self._measured == step:
            monitored = True
        else:
            # Not measured yet: a step gradwatch does not measure (it only counts), or the
            # end of the backward pass could not be caught (then after clipping).
            monitored = watcher.is_monitored(step)
            if monitored and self._capture is not None and args.max_grad_norm:
                self._say(
                    "after-clipping",
                    "gradwatch: at this step the end of the backward pass could not be "
                    "caught, so gradients were measured after the Trainer clipped them "
                    f"(max_grad_norm={args.max_grad_norm}).",
                )
            self._new.extend(
                step_watcher(watcher, step, optimizer=kwargs.get("optimizer"), scaler=self._scaler)
            )
        self._measured = None
        if monitored and self.stop_on is not None:
            self._decide_stop(control, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._rows_in_front:  # the writer could not be placed first: better late
            self._write_row(state, logs)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    # -- measuring -------------------------------------------------------------------------

    def _create_watcher(self, model: torch.nn.Module, args: TrainingArguments) -> gradwatch.Watcher:
        reporters: list[Reporter] = []
        if self._main:
            extras = lambda: self._guard.call(  # noqa: E731
                "wandb alerts", _wandb_reporters, args, default=[]
            )
            reporters = self.options.main_reporters(extras)
        overrides: dict[str, Any] = {}
        if getattr(args, "torch_compile", False):
            # The Trainer compiles the model it wraps: forward hooks added now would force
            # recompiles. Gradient statistics (and dead units from weight-gradient rows) stay.
            overrides["activations"] = False
            logger.info(
                "gradwatch: the Trainer compiles the model (torch_compile=True); activation "
                "statistics are off, gradient statistics continue."
            )
        if self.options.log_stats:
            # On every rank, so that trainer.state.log_history is the same everywhere.
            self._metrics = MetricsBuffer(
                stats=self.options.log_stats,
                max_layers=self.options.log_layers,
                counts=lambda: finding_counts(self._watcher),
            )
            reporters.append(self._metrics)
        return self.options.watch(
            model, reporters=reporters, framework="transformers", **overrides
        )

    def _end_of_backward(self, model: torch.nn.Module, optimizer: Any) -> _EndOfBackward | None:
        # Under fp16 loss scaling the gradients still carry the scale at the end of
        # backward: the watcher is given the scaler and divides it out.
        boundary = _boundary_flag(optimizer)
        if boundary is None:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return None
        return _EndOfBackward(spread(params, _SENTINELS), boundary, self._guard)

    def _measure_final(self, step: int) -> None:
        """At the end of the step's last backward pass: final, unclipped gradients."""
        watcher = self._watcher
        if watcher is None or watcher.closed:
            return
        self._measured = step
        self._new.extend(
            step_watcher(watcher, step, optimizer=self._optimizer, scaler=self._scaler)
        )

    def _also_measured(self, step: int) -> bool:
        """Steps measured besides every ``every_n_steps``-th: the first one, as in plain
        PyTorch, and those the Trainer logs (their rows get that very step's numbers)."""
        if step == 1:
            return True
        args, state = self._args, self._state
        if self._metrics is None or args is None or state is None:
            return False
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return False
        every = getattr(state, "logging_steps", None) or args.logging_steps
        return bool(every) and step % int(every) == 0

    def _decide_stop(self, control: TrainerControl, step: int) -> None:
        stop_on = self.stop_on
        assert stop_on is not None
        matched = self._guard.call("stop_on", stop_on.first_match, self._new, default=None)
        self._new.clear()
        # Every rank asks at the same monitored steps, so this collective cannot hang; a
        # match on any rank stops all of them.
        try:
            stop = any_rank(matched is not None)
        except Exception as error:
            self._guard.fail("stop_on", error)
            self.stop_on = None
            return
        if not stop:
            return
        control.should_training_stop = True
        reason = stop_on.reason(step, matched)
        self.stop_reason = reason
        if self._main:
            logger.error(reason)
            warnings.warn(reason, GradwatchWarning, stacklevel=2)

    # -- log rows --------------------------------------------------------------------------

    def _put_row_writer_first(self) -> None:
        """Place the row writer first in the Trainer's CallbackHandler, and a row trimmer
        just before the console printers: ``report_to``'s callbacks (TensorBoard, W&B, ...)
        run before user callbacks in ``on_log`` and must see gradwatch's keys in the row they
        send; the progress bar's printed line stays the Trainer's own (as under Lightning,
        where gradwatch's keys never reach the progress bar)."""
        handler = _calling_handler(self)
        if handler is None:
            if not self._rows_in_front:
                logger.info(
                    "gradwatch: could not place its log-row writer before the report_to "
                    "callbacks; gradwatch/* metrics reach trainer.state.log_history and the "
                    "callbacks after GradWatchCallback only."
                )
            return

        def replaced(cb: Any) -> bool:  # ours, or one whose owner has left the handler
            if not isinstance(cb, (_RowWriter, _RowTrimmer)):
                return False
            owner = cb.owner
            return owner is None or owner is self or all(c is not owner for c in handler.callbacks)

        arranged: list[Any] = [_RowWriter(self)]
        for cb in handler.callbacks:
            if replaced(cb):
                continue
            if _prints_logs(cb):
                arranged.append(_RowTrimmer(self))
            arranged.append(cb)
        # A new list: the handler may be iterating over the old one right now.
        handler.callbacks = arranged
        self._rows_in_front = True

    def _write_row(self, state: TrainerState, logs: dict[str, float] | None) -> None:
        """Add the newest statistics to a training log row (one with the running ``loss``)
        before the Trainer's logging callbacks send it."""
        if logs is None or "loss" not in logs or self._metrics is None:
            return
        metrics = self._guard.call("metrics", self._metrics.take, default={})
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log has appended a copy of the row to log_history just before on_log.
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and all(
            _same(history[-1].get(k), v) for k, v in logs.items() if k not in metrics
        ):
            history[-1].update(metrics)

    # -- helpers ---------------------------------------------------------------------------

    def _say(self, key: str, text: str) -> None:
        if self._main:
            self._guard.say_once(key, text, level=logging.INFO)

    def _close(self) -> None:
        if self._capture is not None:
            self._capture.disarm()
            self._capture = None
        if self._watcher is not None and not self._watcher.closed:
            self._watcher.close()
        self._args = self._state = self._optimizer = self._scaler = None


class _RowWriter(TrainerCallback):
    """Runs first in ``on_log`` and adds gradwatch's metrics to the row (see
    :meth:`GradWatchCallback._put_row_writer_first`)."""

    def __init__(self, owner: GradWatchCallback) -> None:
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> GradWatchCallback | None:
        return self._owner()

    def on_log(self, args, state, control, logs=None, **kwargs):
        owner = self.owner
        if owner is not None:
            owner._write_row(state, logs)


class _RowTrimmer(_RowWriter):
    """Runs just before a console printer (the progress bar) and takes gradwatch's keys out
    of the row it prints; the loggers and ``trainer.state.log_history`` have them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.owner is not None:
            for key in [k for k in logs if k.startswith(f"{PREFIX}/")]:
                del logs[key]


def _prints_logs(callback: Any) -> bool:
    """The Trainer's console printers: the tqdm progress bar, the plain printer (with
    ``disable_tqdm``) and the notebook progress display."""
    return isinstance(callback, (ProgressCallback, PrinterCallback)) or (
        type(callback).__name__ == "NotebookProgressCallback"
    )


class _EndOfBackward:
    """Calls a function once, at the very end of the next backward pass that completes an
    accumulation window: there the gradients are final (accumulated over the micro-batches,
    averaged by DDP or reduce-scattered by FSDP2) and not yet clipped.

    A gradient landing on one of a few parameters spread over the model says that a backward
    pass is running; it queues a callback with the autograd engine, which runs it once the
    whole backward pass is done. That callback queues the measurement once more, so that it
    runs after the engine's other end-of-backward callbacks (DDP's gradient averaging and
    FSDP2's reduce-scatter finish in theirs, queued during the pass). Hooks exist only
    between :meth:`arm` and the measurement, ahead of monitored steps.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], boundary: Callable[[], bool], guard: Guard
    ) -> None:
        self._params = list(params)
        self._boundary = boundary
        self._guard = guard
        self._handles: list[Any] = []
        self._fn: Callable[[], None] | None = None

    def arm(self, fn: Callable[[], None]) -> None:
        self.disarm()
        self._fn = fn
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for p in self._params]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self._handles or not self._boundary():
            return  # an earlier micro-batch: its gradients are not final yet
        fn, self._fn = self._fn, None
        self.disarm()
        if fn is None:
            return
        engine = torch.autograd.Variable._execution_engine
        run = lambda: self._guard.call("measuring before clipping", fn, default=None)  # noqa: E731
        engine.queue_callback(lambda: engine.queue_callback(run))


def _boundary_flag(optimizer: Any) -> Callable[[], bool] | None:
    """Whether the backward pass running now completes an accumulation window: the Trainer
    sets accelerate's ``GradientState.sync_gradients`` before each micro-batch."""
    state = getattr(optimizer, "gradient_state", None)
    if state is None:
        try:
            from accelerate.state import GradientState

            state = GradientState()
        except Exception:
            return None
    return lambda: bool(state.sync_gradients)


def deepspeed_reason(args: Any) -> str | None:
    """The message when DeepSpeed runs this training (``None`` when it does not).

    DeepSpeed moves gradients into its own partitioned buffers and steps the optimizer
    inside ``backward()``, before any Trainer callback runs, so no callback can see them.
    Detected from the Trainer's arguments (``deepspeed=``), accelerate's state, or the
    environment ``accelerate launch`` sets.
    """
    found = bool(getattr(args, "deepspeed", None)) or (
        getattr(args, "hf_deepspeed_config", None) is not None
    )
    if not found:
        try:
            from accelerate.state import AcceleratorState

            kind = AcceleratorState._shared_state.get("distributed_type")
            found = "DEEPSPEED" in str(kind).upper()
        except Exception:
            pass
    if not found:
        found = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not found:
        return None
    return (
        "gradwatch: DeepSpeed is training this model. It keeps the gradients in its own "
        "partitioned buffers and steps the optimizer inside backward(), before any Trainer "
        "callback runs, so gradient statistics are unavailable and GradWatchCallback does "
        "nothing in this run."
    )


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The Trainer's CallbackHandler that is calling ``callback`` right now (an event
    handler receives the model and optimizer, but not the handler itself)."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and any(
            cb is callback for cb in candidate.callbacks
        ):
            return candidate
        frame = frame.f_back
    return None


def _saved_state(state: TrainerState) -> Mapping[str, Any] | None:
    """The rule state saved in the checkpoint a run resumed from."""
    saved = (state.stateful_callbacks or {}).get(GradWatchCallback.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if not isinstance(saved, Mapping):
        return None
    watcher_state = (saved.get("attributes") or {}).get("_pending_state")
    return watcher_state if isinstance(watcher_state, Mapping) else None


def _wandb_reporters(args: TrainingArguments) -> list[Reporter]:
    """Alerts, chart and summary when the Trainer reports to W&B (the metrics themselves
    go through the Trainer's logging, in its rows)."""
    report_to = args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "wandb" not in report_to:
        return []
    from .wandb import WandbReporter  # imports wandb

    # run=None: the W&B run the Trainer's WandbCallback starts (wandb.run), found when the
    # first statistics arrive.
    return [WandbReporter(run=None, metrics=False)]


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b  # ``is``: a NaN loss is the same object in both rows


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON values (tuples to lists, mappings to dicts)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in options.items() if v is not None}


__all__ = ["GradWatchCallback", "deepspeed_reason"]
