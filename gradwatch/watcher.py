"""The :class:`Watcher`: attaches to a model, measures at monitored steps, runs the rules
and hands findings to the reporters."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec

import torch
from torch import nn

from .amp import ScalerView, check_scaler
from .carry import CarryCheck, checked_parameters
from .collect import Collector, Layout, read
from .coverage import (
    CUT_OFF_LOSS,
    IN_BACKWARD,
    NO_GRADIENT,
    ZERO_GRADIENT,
    Coverage,
    cut_off_finding,
    loss_reaches,
    misplaced_text,
    step_in_backward,
)
from .distributed import Reducer
from .findings import Finding
from .grad_marks import GradientMarks
from .guard import Guard, logger, warn_user
from .history import History
from .keywords import suggest_keywords
from .layers import LayerInfo, discover, is_compiled, trainable_parameters, unwrap
from .optim import describe
from .optimizer_hooks import OptimizerStepHooks, has_step_hooks
from .optimizer_owners import OptimizerOwners
from .precision import AutocastProbe, has_fp16_weights
from .probes import ProbeRecord, Probes
from .reporters import LoggingReporter, Reporter, default_reporters
from .reporters.timing import ReportingClock, slow_reporter_notice
from .routing import RoutingEvidence
from .rules import resolve_rules
from .rules.base import ModelFacts, Rule, RuleContext
from .rules.engine import RuleEngine, SummaryRow
from .rules.zero_gradient import wants_detail
from .sentinel import Sentinel, Trip
from .stats import OptimizerInfo, StepStats
from .structure import WatchedSet
from .transfer import HostTransfer
from .units import alive_table, dead_share_of, shared_groups
from .update import OptimizerCoverage, UpdateLayout, UpdateSampler, moved, read_updates
from .validation import (
    deferred_option,
    flag,
    loss_argument,
    optimizer_object,
    reporter_list,
    scripted_parts,
    string_list,
    whole_number,
)
from .wording import FRAMEWORKS, detect_framework, indexed_classes, layer_classes

# Models being watched, so that a second watch() replaces the first or fails clearly. The
# watchers are held weakly: one dropped without close() (a re-run notebook cell) is
# collected, its hooks go with it, and the model can be watched again.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Watcher]] = (
    weakref.WeakKeyDictionary()
)
_P = ParamSpec("_P")

MAX_FINDINGS = 10_000
#: A layer with at least this share of dead units keeps its ReLU hooked at every step.
_AT_RISK = 0.25


def _undone_on_failure(init: Callable[_P, None]) -> Callable[_P, None]:
    """A watcher that fails to start leaves the model as it found it: no hook left
    behind, and the model free to be watched again."""

    @functools.wraps(init)
    def start(*args: _P.args, **kwargs: _P.kwargs) -> None:
        watcher: Watcher = args[0]  # type: ignore[assignment]
        try:
            init(*args, **kwargs)
        except BaseException:
            watcher._abandon()
            raise
        # Collected without close(): its hooks go too (this holds no reference to it).
        watcher._finalizer = weakref.finalize(watcher, watcher._hook_remover())
        watcher._finalizer.atexit = False

    return start


class Watcher:
    """Watches one model. Create it with :func:`gradwatch.watch`.

    Call :meth:`step` once per optimizer step, after ``backward()`` and before
    ``optimizer.step()`` (or pass ``optimizer=`` and let the optimizer's step hook do it).
    Every ``every_n_steps``-th call is a monitored step: gradients and the activations
    of that step's forward pass are measured, the rules run, and new findings are
    returned and reported. Other calls only count.

    Options:

    - ``every_n_steps``: how often to measure (default 15: three monitored steps, and so a
      finding, within 45 steps). Hooks exist only around
      monitored steps, so the steps in between cost nothing.
    - ``rules``, ``select``, ``ignore``, ``thresholds``: which rules run, by code, code
      prefix or slug (``select=["GW1"]``, ``ignore=["dead-units"]``), and threshold
      overrides (``thresholds={"GW101": {"ratio": 1e-3}}``, each checked against the
      values the rule accepts); ``rules=`` replaces the built-in set (e.g. to add a
      custom :class:`~gradwatch.rules.Rule`).
    - ``reporters``: where findings go (default: terminal and ``logging``; ``[]``: none).
    - ``layers``, ``exclude``: glob patterns of module names to watch / skip.
    - ``optimizer``: lets the rules weigh gradients as the optimizer will (Adam rescales
      them; SGD's learning rate sizes the update). Also accepted by :meth:`step`. Given
      here, gradwatch also steps itself from the optimizer's step hook, inside each
      ``optimizer.step()``: no :meth:`step` call is needed (see
      :mod:`gradwatch.optimizer_hooks`; an explicit call is never counted twice).
    - ``detail_every``: the forward/backward signal norms, parameter norms, max |g| and
      zero share (estimated from a strided sample of 4,096 entries in larger tensors) are
      measured on the first three monitored steps and then at least this many steps
      apart (default 200); gradient norms, dead units and saturation are measured at
      every monitored step.
    - ``history``: how many monitored steps to keep (default 256).
    - ``activations``: set False to measure gradients only (no forward hooks at all).
    - ``sync``: combine statistics across ranks (default: when a process group with more
      than one rank is initialised). Call :meth:`step` on every rank.
    - ``deferred``: read the statistics one monitored step late so the GPU never waits
      for the host (default ``"auto"``: on CUDA).

    Every option is checked here: a wrong value is a ``ValueError`` that names it. A model
    is watched by one watcher at a time: watching it again closes the earlier watcher
    (with a one-line warning), as does a watcher dropped without ``close()``; watching a
    part of a watched model (or the reverse) is a ``ValueError``: :meth:`close` (or
    :func:`gradwatch.release`) frees it first. A
    TorchScript model (``torch.jit.script``/``trace``) cannot be watched (its layers run
    where no Python hook reaches them): watch the eager model, script it afterwards.

    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
    ...     model(torch.randn(16, 4)).pow(2).mean().backward()
    ...     new = watcher.step()
    >>> round(watcher.latest.layers["0"].grad_norm, 6) > 0
    True
    """

    @suggest_keywords("gradwatch.watch()")
    @_undone_on_failure
    def __init__(
        self,
        module: nn.Module,
        *,
        every_n_steps: int = 15,
        rules: Sequence[Rule] | None = None,
        select: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        thresholds: Mapping[str, Mapping[str, float]] | None = None,
        reporters: Sequence[Reporter] | None = None,
        layers: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        optimizer: Any = None,
        history: int = 256,
        detail_every: int = 200,
        activations: bool = True,
        sync: bool | None = None,
        deferred: bool | Literal["auto"] = "auto",
        scaler: Any = None,
        sentinel: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"gradwatch.watch() needs a torch.nn.Module, got {type(module).__name__}"
            )
        whole_number("every_n_steps", every_n_steps)
        whole_number("detail_every", detail_every)
        whole_number("history", history)
        deferred_option(deferred)
        check_scaler(scaler)
        optimizer_object(optimizer)
        flag("activations", activations)
        flag("sentinel", sentinel)
        flag("sync", sync, allow_none=True)
        layers = string_list("layers", layers, what="a module name or glob pattern")
        exclude = string_list("exclude", exclude, what="a module name or glob pattern")
        reporters = reporter_list(reporters)

        self._outer = module
        self.module = unwrap(module)
        exclude = self._leave_out_torchscript(exclude)
        if next(iter(self.module.parameters()), None) is None:
            raise ValueError(
                f"{type(self.module).__name__} has no parameters: there is no gradient to "
                "watch. Pass the model that is being trained."
            )
        if not trainable_parameters(self.module):
            raise ValueError(
                f"every parameter of {type(self.module).__name__} has requires_grad=False: "
                "nothing is trained, so there is no gradient to watch."
            )
        self.rules = resolve_rules(rules, select=select, ignore=ignore, thresholds=thresholds)
        self.reporters: list[Reporter] = (
            list(default_reporters()) if reporters is None else reporters
        )
        self._claim(self.module)

        self.layers: list[LayerInfo] = discover(self.module, include=layers, exclude=exclude)
        if not any(layer.params for layer in self.layers):
            raise ValueError(
                f"layers={list(layers or [])} exclude={list(exclude or [])} leave no module "
                "with trainable parameters; module names look like "
                f"{[n for n, _ in self.module.named_modules()][1:4]}"
            )

        self._watched = WatchedSet(self.module, layers, exclude, layers=self.layers)
        self.every_n_steps = every_n_steps
        #: Steps measured besides every ``every_n_steps``-th one: a predicate on the step
        #: number (``None``: none). Hooks are placed ahead of such steps as well.
        self.also_measure: Callable[[int], bool] | None = None
        self.detail_every = detail_every
        self._guard = Guard()
        self._compiled = is_compiled(module)
        self._activations = activations and not self._compiled
        self._probes = (
            Probes(self.layers, self._guard, root=self.module) if self._activations else None
        )
        if self._compiled:
            self._guard.say_once(
                "compiled",
                "gradwatch: the model is torch.compile'd; forward hooks would force "
                "recompilation, so activation statistics (ReLU activity, saturation, attention "
                "softmax, signal norms, depth order) are off. Gradient statistics, dead units from "
                "weight-gradient rows and missing gradients are still measured.",
                level=logging.WARNING,
            )
            self._probes = None
        self._reducer = Reducer(sync)
        self._collector = Collector(self.layers, self._reducer)
        self._transfer: HostTransfer[tuple[Layout, _StepContext]] = HostTransfer(False)
        self._deferred_setting = deferred
        self._engine = RuleEngine(self.rules, self._guard)
        all_classes = frozenset(type(m).__name__ for m in self.module.modules())
        self._framework = detect_framework(optimizer, scaler) or "pytorch"
        self._fp16 = has_fp16_weights(self.module)
        self._facts = ModelFacts.from_layers(
            self.layers,
            all_classes,
            compiled=self._compiled,
            framework=self._framework,
            fp16=self._fp16,
        )
        # fp16 autocast shows in the first forward pass only (one hook, then none).
        self._autocast = (
            AutocastProbe(self.module, _call_weakly(self, "_note_fp16"))
            if not self._fp16 and not self._compiled
            else None
        )
        self._display = indexed_classes(self.module.named_modules())
        self._history = History(history)
        self._findings: deque[Finding] = deque(maxlen=MAX_FINDINGS)
        self._reporting = ReportingClock()
        self._optimizer = optimizer
        self._scaler = ScalerView(scaler) if scaler is not None else None
        self._params = [p for layer in self.layers for _, p in layer.params]
        self._index_of = {layer.name: layer.index for layer in self.layers}
        self._sentinel_on = sentinel
        self._sentinel = self._make_sentinel()
        self._updates = UpdateSampler(self.layers)
        self._coverage = OptimizerCoverage(self.layers)
        self._flush_next = False
        self._grad_marks = GradientMarks()
        self._depth: dict[int, float] = {}
        self._count = 0
        self._monitored = 0
        self._last_detail = 0
        self._closed = False
        self._force_detail = False
        self._said_no_hooks = False
        self._carry = CarryCheck(checked_parameters(self.layers), self._guard)
        self._owners = OptimizerOwners(self.layers, self._guard)
        self._routing = self._follow_routing()
        self._no_grad_steps = 0  # monitored steps where every .grad was None
        self._no_grad_streak = 0  # such calls in a row
        self._stray_calls = 0  # such calls not counted as steps
        self._zero_grad_steps = 0  # measured steps where every gradient was exactly 0
        self._told: set[str] = set()
        self._empty_reason: str | None = None
        self._handover: tuple[int | None, Any, Any, Any] | None = None
        self._from_hooks: deque[Finding] = deque(maxlen=MAX_FINDINGS)
        self._step_hooks = self._hook_optimizer(optimizer)
        self._hook_remover()  # the finaliser removes the optimizer and routing hooks too
        self._arm_for(0)

    # -- public API --------------------------------------------------------------------

    def step(
        self,
        step: int | None = None,
        *,
        optimizer: Any = None,
        loss: Any = None,
        scaler: Any = None,
    ) -> list[Finding]:
        """Mark the end of a backward pass; measure if this step is monitored.

        ``step`` overrides the step number (a trainer's global step); by default the
        watcher counts calls from 0. ``optimizer`` tells the rules how gradients are
        used (Adam rescales them). ``loss`` (this step's loss: a number or a one-element
        tensor; a per-sample loss is a ``ValueError``, not reduced, since gradwatch cannot
        know your reduction) lets the every-step check see a NaN or a spike in the loss
        itself. ``scaler`` is
        the ``torch.amp.GradScaler`` of fp16 training: statistics are then of unscaled
        gradients, and the Inf gradients of a step the scaler skips are not a NaN
        error. Returns the findings new at this step. After :meth:`close` it measures
        nothing and warns once.
        """
        if self._closed:
            self._guard.say_once(
                "step after close",
                "gradwatch: watcher.step() was called after close(): nothing is measured. "
                "Start a new watcher with gradwatch.watch(model) to go on watching.",
                level=logging.WARNING,
            )
            return []
        # The caller's own arguments: a wrong one is their mistake, said at the call. The
        # usual ones (no optimizer, a one-element loss tensor) pass without a call: right
        # after backward() every line runs with cold caches (see docs/between-steps.md).
        if optimizer is not None:
            optimizer_object(optimizer)
        if loss is not None and not (type(loss) is torch.Tensor and loss.numel() == 1):
            loss_argument(loss)
        hooks = self._step_hooks
        if hooks is not None and hooks.attached and not hooks.claim():
            # The optimizer's step hook counts and measures this step; what is passed
            # here goes with it (see gradwatch.optimizer_hooks).
            self._handover = (step, optimizer, loss, scaler)
            found = list(self._from_hooks)
            self._from_hooks.clear()
            return found
        self._handover = None
        if not self._from_hooks:
            return self._step(step, optimizer, loss, scaler)
        found = list(self._from_hooks)
        self._from_hooks.clear()
        return found + self._step(step, optimizer, loss, scaler)

    def _step(self, step: int | None, optimizer: Any, loss: Any, scaler: Any) -> list[Finding]:
        """One training step: count it, measure it if it is monitored."""
        if self._probes is not None:
            self._probes.losses_done()  # before anything else runs under the loss check
        label = self._count if step is None else int(step)
        if self._routing is not None:
            self._guard.call("routing evidence", self._routing.tick, default=None)
        if optimizer is not None:
            if (
                optimizer is not self._optimizer
                and self._framework == "pytorch"  # an integration's own setting stands
                and (found := detect_framework(optimizer))
            ):
                self.framework = found
            self._optimizer = optimizer
        if scaler is not None and (self._scaler is None or self._scaler.scaler is not scaler):
            check_scaler(scaler)
            self._scaler = ScalerView(scaler)
        findings: list[Finding] = []
        if self._flush_next:  # a sentinel measurement still in flight (deferred mode)
            findings.extend(self._guard.call("statistics", self._read_ready, default=[]))
            self._flush_next = self._transfer.has_pending
        trip = None
        if self._sentinel is not None and not self._guard.is_disabled("statistics"):
            trips = self._guard.call(
                "sentinel", self._sentinel.observe, label, loss, self._scale_tensor(), default=[]
            )
            trip = trips[-1] if trips else None
        if not self.is_monitored(label) and trip is None:
            self._count += 1
            self._arm_for(label + 1)
            self._sample_weights_before(label)
            return findings
        # On every rank at every monitored step, statistics on or off: a rank whose
        # statistics failed after the last step's collectives tells its peers now.
        self._reducer.begin_step()
        new, measured = self._guard.call(
            "statistics", self._monitored_step, label, loss, trip, default=([], True)
        )
        findings.extend(new)
        if self._guard.is_disabled("statistics"):
            self._reducer.announce_failure()  # idempotent: now, or at the next monitored step
            self._reducer.enabled = False
        if measured:
            self._count += 1
            self._arm_for(label + 1)
        self._sample_weights_before(label)
        return findings

    def is_monitored(self, step: int) -> bool:
        """True when :meth:`step` with this step number measures: every ``every_n_steps``-th
        step, and any step that :attr:`also_measure` selects (integrations use it to measure
        on their framework's logging steps too)."""
        if step % self.every_n_steps == 0:
            return True
        extra = self.also_measure
        return extra is not None and bool(extra(step))

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far (the last 10,000), oldest first."""
        return list(self._findings)

    @property
    def latest(self) -> StepStats | None:
        """Statistics of the last monitored step that has been read."""
        return self._history.latest

    @property
    def history(self) -> History:
        """Recent monitored steps (bounded; see ``history=``)."""
        return self._history

    @property
    def disabled(self) -> dict[str, str]:
        """Parts of gradwatch that failed and switched themselves off, with the reason."""
        return self._guard.disabled

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def framework(self) -> str:
        """What the training runs in, so that advice names its options: ``"pytorch"``,
        ``"lightning"``, ``"fabric"``, ``"transformers"`` or ``"accelerate"``. The
        integrations set it; an Accelerate or Fabric optimizer passed to the watcher
        sets it too."""
        return self._framework

    @framework.setter
    def framework(self, value: str) -> None:
        if value not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}; got {value!r}")
        self._framework = value
        self._facts = dataclasses.replace(self._facts, framework=value)

    def _note_fp16(self) -> None:
        """The first forward pass ran under float16 autocast (see gradwatch.precision)."""
        self._fp16 = True
        self._facts = dataclasses.replace(self._facts, fp16=True)

    def summary(self) -> list[SummaryRow]:
        """One row per announced problem: code, rule, layers, first step, status."""
        return self._engine.summary()

    def close(self) -> None:
        """Remove every hook, read any statistics still in flight, print the summary.
        Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._autocast is not None:
            self._autocast.remove()
        if self._probes is not None:
            self._probes.disarm()
        self._guard.call("statistics", self._read_pending, default=[])
        self._watched.close()
        self._remove_loop_hooks()
        summary = self._engine.summary()
        coverage = self.coverage
        with layer_classes(self._display):
            for reporter in self.reporters:
                part = f"reporter {_name(reporter)}"
                told = getattr(reporter, "coverage", None)
                if callable(told):
                    self._guard.call(part, told, coverage, default=None)
                close = getattr(reporter, "close", None)
                if close is not None:
                    self._guard.call(part, close, summary, default=None)
        self._release()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"every {self.every_n_steps} steps"
        n = sum(1 for layer in self.layers if layer.params)
        return f"<gradwatch.Watcher {type(self.module).__name__}: {n} layers, {state}>"

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Rule state and counters, so a resumed run does not re-announce findings."""
        return {
            "count": self._count,
            "monitored": self._monitored,
            "last_detail": self._last_detail,
            "engine": self._engine.state_dict(),
            "findings": [f.to_dict() for f in self._findings],
            "routing": self._routing.state_dict() if self._routing is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._count = int(state.get("count", 0))
        self._monitored = int(state.get("monitored", 0))
        self._last_detail = int(state.get("last_detail", 0))
        self._engine.load_state_dict(state.get("engine", {}))
        self._findings.clear()
        self._findings.extend(Finding.from_dict(f) for f in state.get("findings", []))
        if self._routing is not None:
            self._routing.load_state_dict(dict(state.get("routing", {})))
        self._arm_for(self._count)

    # -- internals ---------------------------------------------------------------------

    def _monitored_step(
        self, label: int, loss: Any, trip: Trip | None
    ) -> tuple[list[Finding], bool]:
        if self._watched.changed():
            self._rebuild(label)
        if not self._gradients_changed():
            if self._no_gradient_at_all(loss):
                # Counted, so that hooks are not left armed on the steps that follow.
                if self._probes is not None:
                    self._probes.take()
                return self._cut_off_finding(label), True
            return [], False  # no backward since the last monitored step: nothing to read
        self._no_grad_streak = 0
        info = describe(self._optimizer)
        record = self._probes.take() if self._probes is not None else None
        if record is not None and record.empty and self._probes is not None and trip is None:
            self._note_no_hooks()
        detail = self._is_detail(label) or trip is not None
        if detail:
            self._last_detail = label
        self._monitored += 1
        self._force_detail = False
        self._guard.call("carried-gradient check", self._carry.start, default=None)
        extras, scaler_state = self._scaler_extras()
        try:
            measured = self._collector.measure(
                label, record or ProbeRecord(), detail=detail, extras=extras
            )
        except Exception:
            self._reducer.announce_failure()
            raise
        if measured is None:
            return [], True
        packed, layout = measured
        layout.scaler = scaler_state
        updates = self._guard.call("update ratio", self._updates.measure, label, default=None)
        if updates is not None:  # travels at the end of the vector: still one transfer
            packed = torch.cat([packed, updates[0].to(packed.device)])
        left_out = self._guard.call(
            "update ratio", self._coverage.left_out, self._optimizer, default={}
        )
        if layout.missing:
            self._forget_removed(layout)
        if layout.order:
            self._update_depth(layout.order)
        # A step measured for a framework's logging (``also_measure``) is read at once:
        # the framework reads its own values there anyway, and its row should carry
        # this step's statistics, not those of an earlier step.
        self._transfer.deferred = self._use_deferred(packed) and not (
            label % self.every_n_steps and self.also_measure is not None
        )
        context = _StepContext(
            info,
            _loss_value(loss) if not packed.is_cuda else None,
            trip,
            updates[1] if updates is not None else None,
            left_out,
            self._recent_loss(),
        )
        findings: list[Finding] = []
        for (ready_layout, ready_context), values in self._transfer.submit(
            packed, (layout, context)
        ):
            findings.extend(self._read(ready_layout, ready_context, values, fresh=True))
        if trip is not None and self._transfer.deferred:
            self._flush_next = True  # read it at the next step, not 15 steps from now
        return findings, True

    def _read(
        self, layout: Layout, context: _StepContext, values: list[float], fresh: bool
    ) -> list[Finding]:
        nonfinite = None
        if _has_nonfinite(values, layout):
            # Look closer next time: the forward pass shows where NaN first appears.
            self._force_detail = True
            self._arm_for(layout.step + 1)
            if fresh and not self._transfer.deferred:  # the gradients are still there
                nonfinite = self._collector.inspect_nonfinite(layout.slots)
        findings = self._process(layout, context, values, nonfinite)
        if wants_detail(self._history):
            # Every gradient exactly 0: the backward signal shows where it stops.
            self._force_detail = True
            self._arm_for(layout.step + 1)
        return findings

    def _read_ready(self) -> list[Finding]:
        findings = []
        for (layout, context), values in self._transfer.poll():
            findings.extend(self._read(layout, context, values, fresh=False))
        return findings

    def _read_pending(self) -> list[Finding]:
        findings = []
        for (layout, context), values in self._transfer.flush():
            findings.extend(self._read(layout, context, values, fresh=False))
        return findings

    def _scale_tensor(self) -> torch.Tensor | None:
        if self._scaler is None or not self._scaler.enabled:
            return None
        return self._scaler.scale_tensor()

    def _scaler_extras(self) -> tuple[list[torch.Tensor], str | None]:
        """The scale to send along with the statistics, and whether the gradients still
        carry it."""
        scale = self._scale_tensor()
        if scale is None or self._scaler is None:
            return [], None
        state = "unscaled" if self._scaler.unscaled(self._optimizer) else "scaled"
        return [scale], state

    def _make_sentinel(self) -> Sentinel | None:
        # Off in multi-process training: a trip seen on one rank would make it measure
        # alone, out of step with the other ranks' exchange of statistics.
        if not self._sentinel_on or self._reducer.world_size > 1:
            return None
        return Sentinel(self._params, deferred=self._deferred_setting)

    def _rebuild(self, label: int) -> None:
        """The model changed (layers frozen, unfrozen, replaced or added): watch the new
        set from now on, and say so once."""
        change = self._watched.rebuild()
        old_depth = {layer.name: self._depth.get(layer.index) for layer in self.layers}
        self.layers = self._watched.layers
        self._claim_new(self.layers)
        if self._probes is not None:
            self._probes.disarm()
            self._probes = Probes(self.layers, self._guard, root=self.module)
            self._hook_remover()  # the finaliser now removes the new probes' hooks
        self._collector = Collector(self.layers, self._reducer)
        all_classes = frozenset(type(m).__name__ for m in self.module.modules())
        self._facts = ModelFacts.from_layers(
            self.layers,
            all_classes,
            compiled=self._compiled,
            framework=self._framework,
            fp16=self._fp16,
        )
        self._display = indexed_classes(self.module.named_modules())
        self._params = [p for layer in self.layers for _, p in layer.params]
        if self._step_hooks is not None:
            self._step_hooks.params = self._params
        self._index_of = {layer.name: layer.index for layer in self.layers}
        self._depth = {
            layer.index: depth
            for layer in self.layers
            if (depth := old_depth.get(layer.name)) is not None
        }
        self._grad_marks.reset()
        self._sentinel = self._make_sentinel()
        self._carry.close()
        self._carry = CarryCheck(checked_parameters(self.layers), self._guard)
        self._owners.close()
        self._owners = OptimizerOwners(self.layers, self._guard)
        if self._routing is not None:
            self._routing.close()
        self._routing = self._follow_routing()
        self._hook_remover()
        self._updates = UpdateSampler(self.layers)
        self._coverage = OptimizerCoverage(self.layers)
        if change:
            text = f"gradwatch: the watched layers changed at step {label} ({change.describe()})"
            if not any(isinstance(r, LoggingReporter) for r in self.reporters):
                logger.info(text)
            for reporter in self.reporters:
                notice = getattr(reporter, "notice", None)
                if callable(notice):
                    self._guard.call(f"reporter {_name(reporter)}", notice, text, default=None)

    def _forget_removed(self, layout: Layout) -> None:
        """Parameters without a gradient whose module was removed from the model are not
        missing: the module is gone (the watched set is rebuilt at the next step)."""
        modules = {layer.index: layer.module for layer in self.layers}
        gone = self._watched.detached([modules[i] for i in layout.missing if i in modules])
        if gone:
            gone_ids = {id(m) for m in gone}
            layout.missing = {
                i: names
                for i, names in layout.missing.items()
                if id(modules.get(i)) not in gone_ids
            }

    def _claim_new(self, layers: list[LayerInfo]) -> None:
        mine = weakref.ref(self)
        for layer in layers:
            ref = _WATCHED.get(layer.module)
            if ref is None or ref() is None:
                _WATCHED[layer.module] = mine

    def _process(
        self,
        layout: Layout,
        context: _StepContext,
        values: list[float],
        nonfinite: tuple[list[int], list[float]] | None,
    ) -> list[Finding]:
        update_values: list[float] = []
        if context.updates is not None and context.updates.length:
            update_values = values[-context.updates.length :]
            values = values[: -context.updates.length]
        stats = read(
            values,
            layout,
            self.layers,
            self._depth,
            context.optimizer,
            nonfinite,
            self._history.latest,
        )
        if self._probes is None or not self._probes.active:
            stats.activations_observed = False
        stats.loss = context.loss
        self._add_loop_evidence(stats)
        if stats.loss is None and self._sentinel is not None:
            stats.loss = self._sentinel.loss_at(stats.step)  # a loss on the GPU, read by now
        stats.recent_loss = context.recent_loss
        self._guard.call(
            "update ratio", self._add_updates, stats, layout, context, update_values, default=None
        )
        trip = context.trip
        if trip is not None:
            stats.trigger = trip.reason
            stats.surge = trip.factor if trip.reason == "surge" else None
            if trip.loss is not None:
                stats.loss = trip.loss
        self._history.append(stats)
        with layer_classes(self._display):  # "0 (Linear)" in what the user reads
            return self._judge_and_report(stats)

    def _judge_and_report(self, stats: StepStats) -> list[Finding]:
        ctx = RuleContext(stats=stats, history=self._history, model=self._facts)
        new = self._engine.evaluate(ctx)
        if self._probes is not None and self._probes.active:
            # After the rules: they have worked out which units are alive (memoised).
            self._probes.set_skip(self._rows_cover_relus(stats))
        self._findings.extend(new)
        clock = self._reporting
        clock.begin(stats.step, judge=not self._closed)
        for reporter in self.reporters:
            name = _name(reporter)
            started = time.perf_counter()
            self._guard.call(f"reporter {name}", reporter.report, stats, new, default=None)
            clock.add(name, time.perf_counter() - started)
        slow = clock.slowest()
        if slow is not None:
            notice = slow_reporter_notice(*slow, every_n_steps=self.every_n_steps)
            self._guard.say_once("slow reporter", notice, level=logging.WARNING)
        return new

    def _sample_weights_before(self, label: int) -> None:
        """Right before a monitored step, sample the weights, so that the monitored step
        sees how far this step's optimizer update moved them."""
        if self.is_monitored(label + 1) and not self._closed:
            self._guard.call("update ratio", self._updates.snapshot, label, default=None)

    def _add_updates(
        self, stats: StepStats, layout: Layout, context: _StepContext, values: list[float]
    ) -> None:
        layers = layout.layers if layout.layers is not None else self.layers
        names = {layer.index: layer.name for layer in layers}
        changed: set[tuple[int, str]] = set()
        if context.updates is not None and values:
            read_updates(stats, values, context.updates, names)
            changed = moved(values, context.updates)
        for index, params in (context.left_out or {}).items():
            layer = stats.layers.get(names.get(index, ""))
            # a left-out parameter that moved all the same: another optimizer updates
            # this module (a GAN's two optimizers)
            elsewhere = any((index, p.split(" ", 1)[0]) in changed for p in params)
            if layer is not None and not elsewhere:
                layer.not_updated = tuple(params)

    def _recent_loss(self) -> float | None:
        """The median of the losses passed at the last steps (checked every step), a
        steadier level than one step's loss."""
        if self._sentinel is None:
            return None
        losses = self._sentinel.state().get("losses") or []
        return statistics.median(losses) if losses else None

    def _rows_cover_relus(self, stats: StepStats) -> set[int]:
        """ReLU modules whose units the feeding Linear/Conv already shows (its zero
        gradient rows are the dead units) need no hook on steps without detail. A layer
        whose units are dying keeps its hook: once no gradient reaches it, its rows show
        nothing, and its ReLU's output is the only witness."""
        assert self._probes is not None
        covered = set(self._probes.skip_core)
        groups = shared_groups(stats)
        alive = alive_table(stats, groups)
        for group in groups:
            if group.producer is None or group.activation is None:
                continue
            activation = self._index_of.get(group.activation)
            if activation is None:
                continue  # the model changed since these statistics were taken
            producer = stats.layers.get(group.producer)
            if self._carry.seen:
                # Gradients carried across steps: a dead unit's row keeps its old gradient.
                covered.discard(activation)
                continue
            seen = alive[(group.producer, group.activation)]  # (alive bits, units, how)
            dead = dead_share_of(seen)
            if (
                dead is not None
                and producer is not None
                and producer.grad_norm  # once no gradient reaches it, rows show nothing
                and producer.units == seen[1]  # (seen is set: dead is)
                and dead < _AT_RISK
            ):
                covered.add(activation)
            else:
                covered.discard(activation)
        return covered

    # -- the training loop (gradwatch.optimizer_hooks, .carry, .routing, .coverage) --------

    @property
    def coverage(self) -> Coverage:
        """How many steps were counted and measured, over how many layers (the close
        summary says it)."""
        return Coverage(
            steps=self._count + self._stray_calls,
            measured=self._monitored + self._no_grad_steps,
            layers=sum(1 for layer in self.layers if layer.params),
            empty=self._no_grad_steps + self._zero_grad_steps,
            reason=self._empty_reason,
        )

    def _hook_optimizer(self, optimizer: Any) -> OptimizerStepHooks | None:
        """With ``optimizer=``, step from the optimizer's own step hook."""
        if optimizer is None:
            return None
        if not has_step_hooks(optimizer):
            self._guard.say_once(
                "no step hooks",
                f"gradwatch: {type(optimizer).__name__} has no step hooks (it is not a "
                "torch.optim.Optimizer): call watcher.step() after loss.backward() and "
                "before optimizer.step().",
            )
            return None
        hooks = OptimizerStepHooks(optimizer, _weak_method(self, "_on_optimizer_step"), self._guard)
        hooks.params = self._params
        return hooks

    def _on_optimizer_step(self) -> None:
        """Inside ``optimizer.step()``, before the update: this step's gradients."""
        if self._closed:
            return
        given, self._handover = self._handover, None
        step, optimizer, loss, scaler = given if given is not None else (None, None, None, None)
        self._from_hooks.extend(self._step(step, optimizer, loss, scaler))

    def _follow_routing(self) -> RoutingEvidence | None:
        watched = {id(p) for p in self._params}
        evidence = self._guard.call(
            "routing evidence", RoutingEvidence, self.module, watched, default=None
        )
        if evidence is not None and not evidence.following:
            return None
        return evidence

    def _no_gradient_at_all(self, loss: Any = None) -> bool:
        """Every watched ``.grad`` is None at a monitored step, twice in a row (or the
        optimizer steps inside backward): say once why, and where ``step()`` belongs.
        True when so: the step is then counted, so that no hook stays armed."""
        if any(p.grad is not None for p in self._params):
            return False
        reason = IN_BACKWARD if step_in_backward(self._params) else NO_GRADIENT
        if reason == NO_GRADIENT and loss_reaches(loss, self._params) is False:
            reason = CUT_OFF_LOSS  # the loss given is evidence: placement is not the cause
        self._no_grad_streak += 1
        if reason != IN_BACKWARD and self._no_grad_streak < 2:
            self._stray_calls += 1
            return False  # once may be a stray call; twice in a row is the loop
        self._no_grad_steps += 1
        self._empty_reason = reason
        self._tell(reason, misplaced_text(reason, hooked=self._step_hooks is not None))
        return True

    def _cut_off_finding(self, label: int) -> list[Finding]:
        """Once: a loss shown not to reach the parameters is a finding (GW104, every
        layer without a gradient), not only a notice: the model does not train."""
        if self._empty_reason != CUT_OFF_LOSS or "cut-off finding" in self._told:
            return []
        self._told.add("cut-off finding")
        steps = self._no_grad_steps + self._stray_calls
        finding = cut_off_finding(label, [layer.name for layer in self.layers], steps)
        self._findings.append(finding)
        return [finding]

    def _add_loop_evidence(self, stats: StepStats) -> None:
        """Per-step evidence gathered between monitored steps, onto this step's stats."""
        if self._routing is not None:
            stats.steps_without_gradient = self._routing.without_gradient()
        stats.carry_checked, stats.carried = self._carry.take()
        stats.optimizer_of = self._owners.of_layer
        if stats.global_grad_norm == 0.0 and all(not s.grad_norm for s in stats):
            self._zero_grad_steps += 1
            self._empty_reason = ZERO_GRADIENT
            self._tell(ZERO_GRADIENT, misplaced_text(ZERO_GRADIENT, hooked=False))

    def _tell(self, key: str, text: str) -> None:
        """A notice about the watching itself, once: to the reporters (terminal), and to
        the "gradwatch" logger as a warning."""
        if key in self._told:
            return
        self._told.add(key)
        warn_user(text, stacklevel=6)
        for reporter in self.reporters:
            notice = getattr(reporter, "notice", None)
            if callable(notice) and not isinstance(reporter, LoggingReporter):
                self._guard.call(f"reporter {_name(reporter)}", notice, text, default=None)

    def _remove_loop_hooks(self) -> None:
        self._owners.close()
        if self._step_hooks is not None:
            self._step_hooks.remove()
        self._carry.close()
        if self._routing is not None:
            self._routing.close()

    def _arm_for(self, label: int) -> None:
        """Place the forward hooks only ahead of a monitored step."""
        if self._probes is None:
            return
        if self.is_monitored(label):
            self._probes.arm(detail=self._is_detail(label))
        elif self._probes.armed:
            self._probes.disarm()
            self._probes.take()

    def _is_detail(self, label: int) -> bool:
        """Detail (signals, parameter norms, max and zero share) on the first three monitored
        steps, so that problems present from the start are judged at once, then at least
        ``detail_every`` steps apart, and right after a step with NaN/Inf gradients."""
        return (
            self._monitored < 3
            or label - self._last_detail >= self.detail_every
            or self._force_detail
        )

    def _gradients_changed(self) -> bool:
        """True when a backward pass ran since the last monitored step: some gradient is
        a new tensor, or was added to in place (accumulation)."""
        return self._grad_marks.changed(self._params)

    def _update_depth(self, order: Mapping[int, int]) -> None:
        depth = {index: float(pos) for index, pos in order.items()}
        by_name = self._index_of
        for layer in self.layers:
            if layer.index in depth or not layer.params:
                continue
            # Parameters used through a parent's forward (attention's out_proj): place
            # them just after the nearest ancestor that ran.
            parts = layer.name.split(".")
            for cut in range(len(parts) - 1, -1, -1):
                parent = by_name.get(".".join(parts[:cut]))
                if parent is not None and parent in depth:
                    depth[layer.index] = depth[parent] + 0.5
                    break
            else:
                if layer.index in self._depth:
                    depth[layer.index] = self._depth[layer.index]
        self._depth = depth

    def _use_deferred(self, packed: torch.Tensor) -> bool:
        if self._deferred_setting == "auto":
            return bool(packed.is_cuda)
        return bool(self._deferred_setting)

    def _note_no_hooks(self) -> None:
        if self._said_no_hooks:
            return
        self._said_no_hooks = True
        self._guard.say_once(
            "no-hooks",
            "gradwatch: no forward hook ran before this monitored step (a compiled model, "
            "or a forward that bypasses the watched modules): activation statistics are "
            "unavailable; gradient statistics continue.",
            level=logging.INFO,
        )

    def _leave_out_torchscript(self, exclude: list[str] | None) -> list[str] | None:
        """Refuse a TorchScript model; leave TorchScript parts of an eager model out."""
        scripted = scripted_parts(self.module)
        if "" in scripted:
            name = getattr(self.module, "original_name", type(self.module).__name__)
            raise ValueError(
                f"the model ({name}) is a TorchScript module (torch.jit.script or "
                "torch.jit.trace): its layers run inside the TorchScript interpreter, where "
                "no Python hook reaches them and they no longer say what kind of layer they "
                "are. Watch the eager model while it trains and script it afterwards for "
                "export (a torch.compile'd model can be watched)."
            )
        if not scripted:
            return exclude
        warn_user(
            f"gradwatch: {', '.join(map(repr, scripted))} of {type(self.module).__name__} "
            "is TorchScript (torch.jit.script or trace): no hook can reach inside it, so it "
            "is not watched; the rest of the model is. Watch before scripting to include it.",
            stacklevel=6,
        )
        return [*(exclude or []), *scripted]

    def _claim(self, root: nn.Module) -> None:
        if _owner(root) is not None:
            gc.collect()  # a dropped watcher caught in a reference cycle goes now
        earlier = _owner(root)
        if earlier is not None and earlier.module is root:
            # The same model watched again (a notebook cell run twice): the newer call is
            # what the person means; the earlier watcher is closed, not left half-attached.
            earlier.close()
            warn_user(
                f"gradwatch: {type(root).__name__} was already watched; that watcher is "
                "closed and this one replaces it.",
                stacklevel=None,
            )
        owner = _owner(root)
        if owner is not None:
            # A part of a watched model, or a model with a watched part: closing a watcher
            # of something else would be a surprise, so say how to free it.
            raise ValueError(
                f"{type(root).__name__} (or a module inside it) is already watched by "
                f"{owner!r}. Use that watcher, or free the model first: call that watcher's "
                "close(), or gradwatch.release(model) to close whichever watcher holds it."
            )
        if any(module in _WATCHED for module in root.modules()):
            # Left by a watcher that was collected without close() (its hooks went with it).
            warn_user(
                f"gradwatch: the previous watcher of {type(root).__name__} was dropped "
                "without close(); this watcher replaces it.",
                stacklevel=None,
            )
        mine = weakref.ref(self)
        for module in root.modules():
            _WATCHED[module] = mine

    def _release(self) -> None:
        finalizer = self.__dict__.get("_finalizer")
        if finalizer is not None:
            finalizer.detach()
        for module in self.module.modules():
            ref = _WATCHED.get(module)
            if ref is not None and ref() in (self, None):
                del _WATCHED[module]

    def _hook_remover(self) -> Callable[[], None]:
        """What removes this watcher's hooks, holding no reference to the watcher (run
        when a watcher is collected without close())."""
        teardown = self.__dict__.get("_teardown")
        if teardown is None:
            teardown = self.__dict__["_teardown"] = _Teardown()
        teardown.probes = self.__dict__.get("_probes")
        teardown.watched = self.__dict__.get("_watched")
        teardown.autocast = self.__dict__.get("_autocast")
        teardown.loop = [
            part
            for part in (
                self.__dict__.get("_step_hooks"),
                self.__dict__.get("_carry"),
                self.__dict__.get("_owners"),
                self.__dict__.get("_routing"),
            )
            if part is not None
        ]
        return teardown

    def _abandon(self) -> None:
        """Undo a watcher that failed to start: remove any hook placed, free the model."""
        self._hook_remover()()
        if "module" in self.__dict__:
            self._release()


def _owner(root: nn.Module) -> Watcher | None:
    """The open watcher that holds ``root`` or a module inside it, if any."""
    for module in root.modules():
        ref = _WATCHED.get(module)
        owner = ref() if ref is not None else None
        if owner is not None and not owner.closed:
            return owner
    return None


class _Teardown:
    """Removes a watcher's process-wide hooks (the armed module hooks and the registration
    hooks that follow the model's changes) without holding the watcher itself."""

    def __init__(self) -> None:
        self.probes: Probes | None = None
        self.watched: WatchedSet | None = None
        self.autocast: AutocastProbe | None = None
        self.loop: list[Any] = []  # optimizer step hooks, carried-gradient check, routing

    def __call__(self) -> None:
        if self.autocast is not None:
            self.autocast.remove()
        if self.probes is not None:
            self.probes.disarm()
        if self.watched is not None:
            self.watched.close()
        for part in self.loop:
            (part.remove if hasattr(part, "remove") else part.close)()


def release(module: nn.Module) -> bool:
    """Close the watcher that holds ``module`` or a module inside it, so that the model
    can be watched again; True if there was one. Watching the same model again needs no
    release (the new watcher replaces the old one); watching a part of it, or the whole
    when a part is watched, does::

        gradwatch.release(model)
        watcher = gradwatch.watch(model.encoder)

    Closing prints the watcher's summary, as :meth:`Watcher.close` does.

    >>> import torch, gradwatch
    >>> model = torch.nn.Linear(3, 1)
    >>> _ = gradwatch.watch(model, reporters=[])
    >>> gradwatch.release(model), gradwatch.release(model)
    (True, False)
    """
    closed = False
    root = unwrap(module)
    while (owner := _owner(root)) is not None:
        owner.close()
        closed = True
    for part in root.modules():  # what collected watchers left behind
        ref = _WATCHED.get(part)
        if ref is not None and ref() is None:
            del _WATCHED[part]
    return closed


@dataclass(frozen=True)
class _StepContext:
    """What travels with a monitored step's statistics besides the vector itself."""

    optimizer: OptimizerInfo | None
    loss: float | None
    trip: Trip | None
    #: the update sums at the end of the vector (None: not measured at this step)
    updates: UpdateLayout | None = None
    #: module index -> parameters the optimizer does not update, with the reason
    left_out: Mapping[int, list[str]] | None = None
    #: median of the losses passed at the last steps
    recent_loss: float | None = None


def _loss_value(loss: Any) -> float | None:
    """The loss as a float, read on the CPU only (on a GPU it would force a sync; the
    sentinel has it there)."""
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and not loss.is_cuda:
        return float(loss.detach())
    return None


def _call_weakly(owner: object, method: str) -> Callable[[], None]:
    """A callable that calls ``owner.method()`` while ``owner`` lives, without keeping it
    alive (for hooks that a watcher dropped without close() leaves behind)."""
    ref = weakref.ref(owner)

    def call() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    return call


def _has_nonfinite(values: list[float], layout: Layout) -> bool:
    # NaN and Inf survive a sum; finite sums of squares of float32 values cannot overflow
    # a float64 sum of a few thousand terms.
    return not math.isfinite(sum(values[: len(layout.slots)]))


def _weak_method(owner: object, name: str) -> Callable[[], None]:
    """``owner.name`` called through a weak reference: the optimizer's hook must not keep
    a dropped watcher alive (its finaliser removes the hook)."""
    ref = weakref.ref(owner)

    def call() -> None:
        target = ref()
        if target is not None:
            getattr(target, name)()

    return call


def _name(reporter: object) -> str:
    return getattr(reporter, "name", type(reporter).__name__)


@suggest_keywords("gradwatch.watch()")
def watch(
    module: nn.Module,
    *,
    every_n_steps: int = 15,
    rules: Sequence[Rule] | None = None,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    reporters: Sequence[Reporter] | None = None,
    layers: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    optimizer: Any = None,
    history: int = 256,
    detail_every: int = 200,
    activations: bool = True,
    sync: bool | None = None,
    deferred: bool | Literal["auto"] = "auto",
    scaler: Any = None,
    sentinel: bool = True,
) -> Watcher:
    """Start watching ``module`` (any ``nn.Module``); returns the :class:`Watcher`.

    Call ``watcher.step()`` after ``loss.backward()`` and before ``optimizer.step()``.
    Every option is keyword-only; a misspelled one is a ``TypeError`` that suggests the
    closest name. Watching a model that is already watched (a notebook cell run again)
    closes the earlier watcher and says so in one line.

    Args:
        every_n_steps: measure every n-th step (default 15); the steps between cost
            almost nothing (a NaN/Inf or a surge is still checked every step).
        rules: the rules to run instead of the built-in set (e.g. to add your own
            :class:`~gradwatch.rules.Rule`).
        select, ignore: keep / drop rules by code, code prefix or slug
            (``select=["GW1"]``, ``ignore=["dead-units"]``).
        thresholds: per-rule threshold overrides, ``{"GW101": {"ratio": 1e-3}}``.
        reporters: where findings go (default: the terminal and the ``logging`` logger
            "gradwatch"; ``[]`` for none).
        layers, exclude: glob patterns of module names to watch / to skip.
        optimizer: the optimizer instance (not its class), so that the rules weigh
            gradients as it will (Adam rescales them; SGD's learning rate sizes the
            step). Also accepted by ``watcher.step(optimizer=...)``.
        history: how many monitored steps to keep (default 256).
        detail_every: steps between the more expensive detail measurements (default 200).
        activations: False measures gradients only (no forward hooks).
        sync: combine statistics across ranks (default: when a process group with more
            than one rank is initialised).
        deferred: read statistics one monitored step late so a GPU never waits
            (default ``"auto"``: on CUDA).
        scaler: the ``torch.amp.GradScaler`` of fp16 training (statistics are then of
            unscaled gradients, and a step the scaler skips is not a NaN error).
        sentinel: check every step for NaN/Inf and sudden gradient jumps (default True).

    >>> import torch, gradwatch
    >>> model = torch.nn.Linear(3, 1)
    >>> watcher = gradwatch.watch(model, reporters=[])
    >>> watcher.close()
    >>> gradwatch.watch(model, every_n_step=5)
    Traceback (most recent call last):
    ...
    TypeError: gradwatch.watch() has no option 'every_n_step'; did you mean 'every_n_steps'?
    """
    return Watcher(
        module,
        every_n_steps=every_n_steps,
        rules=rules,
        select=select,
        ignore=ignore,
        thresholds=thresholds,
        reporters=reporters,
        layers=layers,
        exclude=exclude,
        optimizer=optimizer,
        history=history,
        detail_every=detail_every,
        activations=activations,
        sync=sync,
        deferred=deferred,
        scaler=scaler,
        sentinel=sentinel,
    )


__all__ = ["Watcher", "logger", "release", "watch"]
