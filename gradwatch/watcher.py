"""The :class:`Watcher`: attaches to a model, measures at monitored steps, runs the rules
and hands findings to the reporters."""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .collect import Collector, Layout, read
from .distributed import Reducer
from .findings import Finding
from .guard import Guard, logger
from .history import History
from .layers import LayerInfo, discover, is_compiled, trainable_parameters, unwrap
from .optim import describe
from .probes import ProbeRecord, Probes
from .reporters import Reporter, default_reporters
from .rules import resolve_rules
from .rules.base import ModelFacts, Rule, RuleContext
from .rules.engine import RuleEngine, SummaryRow
from .stats import OptimizerInfo, StepStats
from .transfer import HostTransfer
from .units import alive_units, dead_fraction, unit_groups
from .validation import deferred_option, whole_number

# Models being watched, so that a second watch() on the same modules fails clearly.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()

MAX_FINDINGS = 10_000
#: A layer with at least this share of dead units keeps its ReLU hooked at every step.
_AT_RISK = 0.25


class Watcher:
    """Watches one model. Create it with :func:`gradwatch.watch`.

    Call :meth:`step` once per optimizer step, after ``backward()`` and before
    ``optimizer.step()``. Every ``every_n_steps``-th call is a monitored step: gradients
    and the activations of that step's forward pass are measured, the rules run, and
    new findings are returned and reported. Other calls only count.

    Options:

    - ``every_n_steps``: how often to measure (default 15: three monitored steps, and so a
      finding, within 45 steps). Hooks exist only around
      monitored steps, so the steps in between cost nothing.
    - ``rules``, ``select``, ``ignore``, ``thresholds``: which rules run, by code, code
      prefix or slug (``select=["GW1"]``, ``ignore=["dead-units"]``), and threshold
      overrides (``thresholds={"GW101": {"ratio": 1e-3}}``); ``rules=`` replaces the
      built-in set (e.g. to add a custom :class:`~gradwatch.rules.Rule`).
    - ``reporters``: where findings go (default: terminal and ``logging``; ``[]``: none).
    - ``layers``, ``exclude``: glob patterns of module names to watch / skip.
    - ``optimizer``: lets the rules weigh gradients as the optimizer will (Adam rescales
      them; SGD's learning rate sizes the update). Also accepted by :meth:`step`.
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

    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
    ...     model(torch.randn(16, 4)).pow(2).mean().backward()
    ...     new = watcher.step()
    >>> round(watcher.latest.layers["0"].grad_norm, 6) > 0
    True
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        every_n_steps: int = 15,
        rules: Sequence[Rule] | None = None,
        select: Iterable[str] | None = None,
        ignore: Iterable[str] | None = None,
        thresholds: Mapping[str, Mapping[str, float]] | None = None,
        reporters: Sequence[Reporter] | None = None,
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        optimizer: Any = None,
        history: int = 256,
        detail_every: int = 200,
        activations: bool = True,
        sync: bool | None = None,
        deferred: bool | Literal["auto"] = "auto",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"gradwatch.watch() needs a torch.nn.Module, got {type(module).__name__}"
            )
        whole_number("every_n_steps", every_n_steps)
        whole_number("detail_every", detail_every)
        deferred_option(deferred)

        self._outer = module
        self.module = unwrap(module)
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
        self._claim(self.module)

        try:
            self.layers: list[LayerInfo] = discover(self.module, include=layers, exclude=exclude)
            if not any(layer.params for layer in self.layers):
                raise ValueError(
                    f"layers={list(layers or [])} exclude={list(exclude or [])} leave no module "
                    "with trainable parameters; module names look like "
                    f"{[n for n, _ in self.module.named_modules()][1:4]}"
                )
            self.rules = resolve_rules(rules, select=select, ignore=ignore, thresholds=thresholds)
            self.reporters: list[Reporter] = (
                list(default_reporters()) if reporters is None else list(reporters)
            )
            for reporter in self.reporters:
                if not callable(getattr(reporter, "report", None)):
                    raise ValueError(
                        f"reporter {reporter!r} has no report(stats, findings) method; "
                        "subclass gradwatch.Reporter"
                    )
        except Exception:
            self._release()
            raise

        self.every_n_steps = every_n_steps
        #: Steps measured besides every ``every_n_steps``-th one: a predicate on the step
        #: number (``None``: none). Hooks are placed ahead of such steps as well.
        self.also_measure: Callable[[int], bool] | None = None
        self.detail_every = detail_every
        self._guard = Guard()
        self._compiled = is_compiled(module)
        self._probes = Probes(self.layers, self._guard) if activations else None
        if self._compiled:
            self._guard.say_once(
                "compiled",
                "gradwatch: the model is torch.compile'd; forward hooks would force "
                "recompilation, so activation statistics (ReLU activity, saturation, "
                "signal norms, depth order) are off. Gradient statistics, dead units from "
                "weight-gradient rows and missing gradients are still measured.",
                level=logging.WARNING,
            )
            self._probes = None
        self._reducer = Reducer(sync)
        self._collector = Collector(self.layers, self._reducer)
        self._transfer: HostTransfer[tuple[Layout, OptimizerInfo | None]] = HostTransfer(False)
        self._deferred_setting = deferred
        self._engine = RuleEngine(self.rules, self._guard)
        all_classes = frozenset(type(m).__name__ for m in self.module.modules())
        self._facts = ModelFacts.from_layers(self.layers, all_classes, compiled=self._compiled)
        self._history = History(history)
        self._findings: deque[Finding] = deque(maxlen=MAX_FINDINGS)
        self._optimizer = optimizer
        self._params = [p for layer in self.layers for _, p in layer.params]
        self._index_of = {layer.name: layer.index for layer in self.layers}
        self._seen_grads: list[tuple[Any, int] | None] = []
        self._depth: dict[int, float] = {}
        self._count = 0
        self._monitored = 0
        self._last_detail = 0
        self._closed = False
        self._force_detail = False
        self._said_no_hooks = False
        self._arm_for(0)

    # -- public API --------------------------------------------------------------------

    def step(self, step: int | None = None, *, optimizer: Any = None) -> list[Finding]:
        """Mark the end of a backward pass; measure if this step is monitored.

        ``step`` overrides the step number (a trainer's global step); by default the
        watcher counts calls from 0. ``optimizer`` tells the rules how gradients are
        used (Adam rescales them). Returns the findings new at this step.
        """
        if self._closed:
            return []
        label = self._count if step is None else int(step)
        if not self.is_monitored(label):
            self._count += 1
            self._arm_for(label + 1)
            return []
        # On every rank at every monitored step, statistics on or off: a rank whose
        # statistics failed after the last step's collectives tells its peers now.
        self._reducer.begin_step()
        findings, measured = self._guard.call(
            "statistics", self._monitored_step, label, optimizer, default=([], True)
        )
        if self._guard.is_disabled("statistics"):
            self._reducer.announce_failure()  # idempotent: now, or at the next monitored step
            self._reducer.enabled = False
        if measured:
            self._count += 1
            self._arm_for(label + 1)
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

    def summary(self) -> list[SummaryRow]:
        """One row per announced problem: code, rule, layers, first step, status."""
        return self._engine.summary()

    def close(self) -> None:
        """Remove every hook, read any statistics still in flight, print the summary.
        Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._probes is not None:
            self._probes.disarm()
        pending = self._guard.call("statistics", self._transfer.flush, default=[])
        for (layout, info), values in pending:
            self._guard.call("statistics", self._process, layout, info, values, None, default=[])
        summary = self._engine.summary()
        for reporter in self.reporters:
            close = getattr(reporter, "close", None)
            if close is not None:
                self._guard.call(f"reporter {_name(reporter)}", close, summary, default=None)
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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._count = int(state.get("count", 0))
        self._monitored = int(state.get("monitored", 0))
        self._last_detail = int(state.get("last_detail", 0))
        self._engine.load_state_dict(state.get("engine", {}))
        self._findings.clear()
        self._findings.extend(Finding.from_dict(f) for f in state.get("findings", []))
        self._arm_for(self._count)

    # -- internals ---------------------------------------------------------------------

    def _monitored_step(self, label: int, optimizer: Any) -> tuple[list[Finding], bool]:
        if not self._gradients_changed():
            return [], False  # no backward since the last monitored step: nothing to read
        if optimizer is not None:
            self._optimizer = optimizer
        info = describe(self._optimizer)
        record = self._probes.take() if self._probes is not None else None
        if record is not None and record.empty and self._probes is not None:
            self._note_no_hooks()
        detail = self._is_detail(label)
        if detail:
            self._last_detail = label
        self._monitored += 1
        self._force_detail = False
        try:
            measured = self._collector.measure(label, record or ProbeRecord(), detail=detail)
        except Exception:
            self._reducer.announce_failure()
            raise
        if measured is None:
            return [], True
        packed, layout = measured
        if layout.order:
            self._update_depth(layout.order)
        self._transfer.deferred = self._use_deferred(packed)
        findings: list[Finding] = []
        for (ready_layout, ready_info), values in self._transfer.submit(packed, (layout, info)):
            nonfinite = None
            if _has_nonfinite(values, ready_layout):
                # Look closer next time: the forward pass shows where NaN first appears.
                self._force_detail = True
                if not self._transfer.deferred:  # the gradients are still there to inspect
                    nonfinite = self._collector.inspect_nonfinite(ready_layout.slots)
            findings.extend(self._process(ready_layout, ready_info, values, nonfinite))
        return findings, True

    def _process(
        self,
        layout: Layout,
        info: OptimizerInfo | None,
        values: list[float],
        nonfinite: tuple[list[int], list[float]] | None,
    ) -> list[Finding]:
        stats = read(
            values, layout, self.layers, self._depth, info, nonfinite, self._history.latest
        )
        if self._probes is None or not self._probes.active:
            stats.activations_observed = False
        self._history.append(stats)
        ctx = RuleContext(stats=stats, history=self._history, model=self._facts)
        new = self._engine.evaluate(ctx)
        if self._probes is not None and self._probes.active:
            # After the rules: they have worked out which units are alive (memoised).
            self._probes.set_skip(self._rows_cover_relus(stats))
        self._findings.extend(new)
        for reporter in self.reporters:
            part = f"reporter {_name(reporter)}"
            self._guard.call(part, reporter.report, stats, new, default=None)
        return new

    def _rows_cover_relus(self, stats: StepStats) -> set[int]:
        """ReLU modules whose units the feeding Linear/Conv already shows (its zero
        gradient rows are the dead units) need no hook on steps without detail. A layer
        whose units are dying keeps its hook: once no gradient reaches it, its rows show
        nothing, and its ReLU's output is the only witness."""
        assert self._probes is not None
        covered = set(self._probes.skip_core)
        for group in unit_groups(stats):
            if group.producer is None or group.activation is None:
                continue
            activation = self._index_of[group.activation]
            producer = stats.layers.get(group.producer)
            seen = alive_units(group, stats)
            dead = dead_fraction(group, stats)
            if (
                seen is not None
                and dead is not None
                and producer is not None
                and producer.grad_norm  # once no gradient reaches it, rows show nothing
                and producer.units == seen[0].size
                and dead < _AT_RISK
            ):
                covered.add(activation)
            else:
                covered.discard(activation)
        return covered

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
        before = self._seen_grads
        seen = [
            None if grad is None else (weakref.ref(grad), grad._version)
            for grad in [p.grad for p in self._params]
        ]
        self._seen_grads = seen
        if len(before) != len(seen):
            return any(s is not None for s in seen)
        for now, then in zip(seen, before):
            if now is not None and (
                then is None or then[0]() is not now[0]() or now[1] != then[1]
            ):
                return True
        return False

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

    def _claim(self, root: nn.Module) -> None:
        for module in root.modules():
            owner = _WATCHED.get(module)
            if owner is not None and not owner._closed:
                raise ValueError(
                    f"{type(root).__name__} (or a module inside it) is already watched by "
                    f"{owner!r}. Use that watcher, or call its close() before watching again."
                )
        for module in root.modules():
            _WATCHED[module] = self

    def _release(self) -> None:
        for module in self.module.modules():
            if _WATCHED.get(module) is self:
                del _WATCHED[module]


def _has_nonfinite(values: list[float], layout: Layout) -> bool:
    # NaN and Inf survive a sum; finite sums of squares of float32 values cannot overflow
    # a float64 sum of a few thousand terms.
    return not math.isfinite(sum(values[: len(layout.slots)]))


def _name(reporter: object) -> str:
    return getattr(reporter, "name", type(reporter).__name__)


def watch(module: nn.Module, **options: Any) -> Watcher:
    """Start watching ``module``; see :class:`Watcher` for the options.

    >>> import torch, gradwatch
    >>> model = torch.nn.Linear(3, 1)
    >>> watcher = gradwatch.watch(model, reporters=[])
    >>> watcher.close()
    """
    return Watcher(module, **options)


__all__ = ["Watcher", "logger", "watch"]
