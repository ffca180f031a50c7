"""What the training-framework callbacks share (Lightning's and the Transformers Trainer's):
their options, the stop condition, finding counts, and the metrics they hand to the
framework's own logging. Framework-free: torch, the gradwatch core and the standard library.

Both callbacks work the same way:

- they measure on gradwatch's own interval (``every_n_steps``, 15 by default, as with
  :func:`gradwatch.watch`) and, besides, at every step at which the framework writes a
  log row (:attr:`gradwatch.Watcher.also_measure`), so the row gets that very step's numbers;
- they hand the newest statistics to the framework's logging only when it writes a row
  (:class:`MetricsBuffer`), so ``gradwatch/*`` values share the rows (step, epoch) of the
  framework's own metrics and reach every logger the user configured;
- findings go to the reporters (terminal, ``logging``, W&B alerts) on the main process only;
  every process measures, because statistics are combined across ranks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

import gradwatch
from gradwatch.findings import SEVERITIES, Finding, severity_rank
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
from gradwatch.validation import deferred_option, flag, whole_number

#: Per-layer statistics that ``log_stats=`` may name (fields of :class:`LayerStats`, plus
#: ``active_fraction``: the share of a ReLU layer's units active in the step's batch).
LOGGABLE_STATS = LAYER_STATS
DEFAULT_LOG_STATS = DEFAULT_STATS
PREFIX = "gradwatch"
_ACTIVE = ("new", "worse", "reminder")  # statuses that announce a problem (not "resolved")


class CallbackOptions:
    """The options every gradwatch callback takes, checked once (a clear ``ValueError``).

    >>> options = CallbackOptions(every_n_steps=10, stop_on="error", log_stats=["grad_norm"])
    >>> options.every_n_steps, str(options.stop_on), options.log_stats
    (10, 'error', ('grad_norm',))
    >>> CallbackOptions(log_layers=0)
    Traceback (most recent call last):
    ...
    ValueError: log_layers must be a whole number >= 1 or None, got 0
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
        sentinel: bool = True,
    ) -> None:
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("detail_every", detail_every),
            ("history", history),
            ("log_layers", log_layers),
        ):
            whole_number(name, value, allow_none=True)
        deferred_option(deferred)
        flag("activations", activations)
        flag("sentinel", sentinel)
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
        self.log_stats = parse_log_stats(log_stats)
        self.log_layers = log_layers
        self.reporters = reporters
        self.watch_options: dict[str, Any] = {
            "rules": rules,
            "select": select,
            "ignore": ignore,
            "thresholds": thresholds,
            "layers": layers,
            "exclude": exclude,
            "activations": activations,
            "deferred": deferred,
            "sentinel": sentinel,
        }
        # Left out when not given: the watcher's own defaults apply.
        if every_n_steps is not None:
            self.watch_options["every_n_steps"] = every_n_steps
        if history is not None:
            self.watch_options["history"] = history
        if detail_every is not None:
            self.watch_options["detail_every"] = detail_every

    def main_reporters(self, framework_extras: Callable[[], list[Reporter]]) -> list[Reporter]:
        """Reporters for the main process: the user's, or the defaults plus what the framework
        setup adds (W&B alerts when W&B is attached). ``framework_extras`` runs only then."""
        if self.reporters is not None:
            return list(self.reporters)
        return [*default_reporters(), *framework_extras()]

    def watch(
        self,
        module: torch.nn.Module,
        *,
        reporters: Sequence[Reporter],
        framework: str = "pytorch",
        **overrides: Any,
    ) -> gradwatch.Watcher:
        """The watcher for ``module``; ``framework`` makes its advice name that
        framework's options (``gradient_clip_val``, ``max_grad_norm``)."""
        options = {**self.watch_options, **overrides}
        watcher = gradwatch.watch(module, reporters=list(reporters), **options)
        watcher.framework = framework
        return watcher


def parse_log_stats(value: bool | Sequence[str] | None) -> tuple[str, ...]:
    if value is True:
        return DEFAULT_LOG_STATS
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    return check_stats(tuple(value), "log_stats")


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
        if isinstance(value, str):
            items: list[Any] = [value]
        elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
            items = list(value)
        else:  # True, 1, ...: say what is accepted instead of "not iterable"
            items = []
        if not items or not all(isinstance(item, str) and item.strip() for item in items):
            raise ValueError(
                f"stop_on must be a severity ({', '.join(SEVERITIES)}), a rule code or slug, "
                f"or a list of them (e.g. stop_on=\"error\" or stop_on=[\"GW103\"]); None "
                f"never stops; got {value!r}"
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

    def reason(self, step: int, matched: Finding | None) -> str:
        """What the person training reads when this condition stopped the run."""
        if matched is None:
            return f"gradwatch stopped training at step {step}: stop_on matched on another rank"
        return (
            f"gradwatch stopped training at step {step} (stop_on={self}): "
            f"{matched.title} [{matched.severity}] {matched.message}"
        )

    def __str__(self) -> str:
        parts = ([self.severity] if self.severity else []) + list(self.rules)
        return parts[0] if len(parts) == 1 else repr(parts)

    def __repr__(self) -> str:
        return f"StopCondition(severity={self.severity!r}, rules={self.rules!r})"


def finding_counts(watcher: gradwatch.Watcher | None) -> tuple[dict[str, int], int]:
    """Problems active now per rule code (every watched rule, 0 included: a chart of it
    shows when each problem was present and when it cleared), and how many in all."""
    if watcher is None:
        return {}, 0
    active = Counter(row.code for row in watcher.summary() if row.status == "active")
    codes = {rule.code: active.get(rule.code, 0) for rule in watcher.rules}
    codes.update(active)
    return codes, sum(active.values())


class MetricsBuffer(Reporter):
    """Keeps the newest monitored step's statistics until the framework writes a log row.

    A callback calls :meth:`take` when the framework logs (Lightning's ``log_every_n_steps``,
    the Trainer's ``logging_steps``) and adds the result to that row. Keys:
    ``gradwatch/<stat>/<layer>`` per layer (at most ``max_layers`` of them, spread evenly
    in depth, chosen once), ``gradwatch/global_grad_norm``, ``gradwatch/global_param_norm``
    (on detail steps), ``gradwatch/findings/<code>`` (that rule's problems active at this
    step: 1 while a problem is present, back to 0 once it is resolved) and
    ``gradwatch/active_findings`` (problems not yet resolved, all rules).
    """

    name = "framework-metrics"

    def __init__(
        self,
        *,
        stats: Sequence[str] = DEFAULT_LOG_STATS,
        max_layers: int | None = 50,
        counts: Callable[[], tuple[dict[str, int], int]] | None = None,
    ) -> None:
        self.stats = tuple(stats)
        self.max_layers = max_layers
        self.counts = counts
        self._layers = LayerSelection(self.stats, max_layers)
        self._pending: StepStats | None = None

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        self._pending = stats

    @property
    def pending_step(self) -> int | None:
        """The step whose statistics the next :meth:`take` returns (``None``: nothing new)."""
        return self._pending.step if self._pending is not None else None

    def take(self) -> dict[str, float]:
        """The newest statistics not logged yet, as ``{key: number}`` (empty when none)."""
        stats, self._pending = self._pending, None
        return self.metrics(stats) if stats is not None else {}

    def metrics(self, stats: StepStats) -> dict[str, float]:
        """The flat ``{key: number}`` dictionary for one monitored step."""
        out = global_metrics(stats, PREFIX)
        out.update(self._layers.metrics(stats, PREFIX))
        if self.counts is not None:
            codes, active = self.counts()
            for code, count in sorted(codes.items()):
                out[f"{PREFIX}/findings/{code}"] = float(count)
            out[f"{PREFIX}/active_findings"] = float(active)
        return out

    def close(self, summary: Sequence[Any]) -> None:
        self.counts = None  # holds the callback (and so the watcher) otherwise


def step_watcher(
    watcher: gradwatch.Watcher,
    step: int,
    *,
    optimizer: Any = None,
    scaler: Any = None,
    loss: Any = None,
) -> list[Finding]:
    """``watcher.step(step, optimizer=..., scaler=..., loss=...)``: a GradScaler makes the
    statistics those of unscaled gradients (a step the scaler skips is no NaN error); the
    loss feeds the every-step sentinel."""
    return watcher.step(step, optimizer=optimizer, scaler=scaler, loss=loss)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank of the default process group (every rank must
    call it at the same point); ``flag`` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return bool(flag)
    backend = str(dist.get_backend()).lower()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend and torch.cuda.is_available()
        else torch.device("cpu")
    )
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def every_rank(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (see :func:`any_rank`)."""
    return not any_rank(not flag)


__all__ = [
    "DEFAULT_LOG_STATS",
    "LOGGABLE_STATS",
    "CallbackOptions",
    "MetricsBuffer",
    "StopCondition",
    "any_rank",
    "every_rank",
    "finding_counts",
    "parse_log_stats",
    "step_watcher",
]
