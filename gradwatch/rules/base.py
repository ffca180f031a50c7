"""The rule protocol: a :class:`Rule` looks at a monitored step and returns
:class:`Condition`\\ s; the engine turns persistent conditions into findings.

Writing a rule takes a code, a slug, a docstring-like explanation, default thresholds
and a ``check`` method::

    from gradwatch.rules import POSITIVE, Condition, Rule

    class TinyLoss(Rule):
        code = "X001"
        slug = "huge-global-norm"
        summary = "the global gradient norm is above a fixed limit"
        explanation = "What, why, how to fix ..."
        defaults = {"limit": 1e3}
        threshold_specs = {"limit": POSITIVE}  # thresholds={"X001": {"limit": -1}} is an error

        def check(self, ctx):
            norm = ctx.stats.global_grad_norm
            if norm > self.t("limit"):
                return [Condition(layers=(), message=f"global norm {norm:.3g}",
                                  hint="clip gradients", evidence={"norm": norm})]
            return []

    gradwatch.watch(model, rules=[*gradwatch.rules.builtin_rules(), TinyLoss()])

``check`` returns ``[]`` when it judged the step healthy and ``None`` when it could not
judge it (the statistic it needs was not measured): only the former counts towards
clearing a finding.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..findings import Severity, severity_rank
from ..history import History
from ..kinds import MATRIX_KINDS, NORM
from ..stats import LayerStats, StepStats
from ..wording import display_name

if TYPE_CHECKING:  # layers needs torch; rule metadata must not
    from ..layers import LayerInfo


@dataclass(frozen=True)
class ModelFacts:
    """What the model is made of, for hints that name a specific cure."""

    kinds: Counter[str]
    activation_classes: frozenset[str]
    has_normalization: bool
    matrix_layers: int
    compiled: bool = False
    #: what the training runs in ("pytorch", "lightning", "fabric", "transformers",
    #: "accelerate"), so hints name its options (see :mod:`gradwatch.wording`)
    framework: str = "pytorch"
    #: class name of each watched module, by qualified name
    classes: Mapping[str, str] = field(default_factory=dict)
    #: trains in float16 (autocast or fp16 weights), see :mod:`gradwatch.precision`
    fp16: bool = False

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[LayerInfo],
        all_classes: frozenset[str],
        compiled: bool = False,
        framework: str = "pytorch",
        fp16: bool = False,
    ) -> ModelFacts:
        kinds = Counter(layer.kind for layer in layers)
        return cls(
            kinds=kinds,
            activation_classes=all_classes,
            has_normalization=kinds.get(NORM, 0) > 0
            or any("Norm" in name for name in all_classes),
            matrix_layers=sum(kinds.get(k, 0) for k in MATRIX_KINDS),
            compiled=compiled,
            framework=framework,
            classes={layer.name: type(layer.module).__name__ for layer in layers},
            fp16=fp16,
        )

    def uses(self, *class_names: str) -> bool:
        return any(name in self.activation_classes for name in class_names)


@dataclass
class RuleContext:
    """What a rule sees: this step, the recent ones, and facts about the model."""

    stats: StepStats
    history: History
    model: ModelFacts

    def recent(self, n: int) -> list[StepStats]:
        """The last ``n`` monitored steps including this one, oldest first.

        Steps measured off schedule because the every-step sentinel tripped are left out
        (except this one): persistence means "over scheduled steps", not over the few
        consecutive steps of an emergency."""
        if n <= 0:
            return []
        steps = self.history.last(n + 8)
        current = steps[-1] if steps and steps[-1] is self.stats else None
        earlier = [s for s in (steps[:-1] if current is not None else steps) if s.trigger is None]
        chosen = earlier[-(n - 1) :] if n > 1 else []
        return [*chosen, current] if current is not None else earlier[-n:]


@dataclass(frozen=True)
class Condition:
    """A problem a rule sees at this step.

    ``score`` measures how bad it is (larger is worse): an announced condition is
    announced again as ``"worse"`` when its score rises by the rule's ``worse_by``.
    ``key`` separates independent conditions of one rule (e.g. spike vs. depth growth).
    """

    layers: tuple[str, ...]
    message: str
    hint: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    severity: Severity | None = None
    score: float = 0.0
    key: str = ""
    #: overrides the rule's window (1: announce at once, e.g. when waiting would be too late)
    window: int | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ThresholdSpec:
    """The values a threshold accepts: a number (or a whole number) within bounds.

    Declared per threshold in :attr:`Rule.threshold_specs`, so that a wrong override is
    a clear ``ValueError`` when the watcher is built instead of a rule that silently
    never fires. Use the ready-made specs: :data:`POSITIVE`, :data:`RATIO`,
    :data:`SHARE`, :func:`greater_than` and :func:`whole_at_least`.

    >>> RATIO.check(0.01)
    0.01
    >>> RATIO.describe(), whole_at_least(2).describe()
    ('a number in (0, 1)', 'a whole number >= 2')
    >>> RATIO.check(-1)
    Traceback (most recent call last):
    ...
    ValueError: a number in (0, 1)
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    finite: bool = True
    #: another threshold of the same rule that this one must not exceed
    at_most: str | None = None

    def check(self, value: Any) -> Any:
        """``value`` as the rule will use it (an int for whole numbers), or ``ValueError``."""
        if not _is_number(value) or math.isnan(value) or (self.finite and math.isinf(value)):
            raise ValueError(self.describe())
        if self.whole:
            if not float(value).is_integer():
                raise ValueError(self.describe())
            value = int(value)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ValueError(self.describe())
        if self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        ):
            raise ValueError(self.describe())
        return value

    def describe(self) -> str:
        """The accepted values in words, for error messages and ``gradwatch explain``."""
        noun = "a whole number" if self.whole else "a number"
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun if self.finite else f"{noun} (not NaN)"


#: Any number but NaN: what a numeric threshold without a declared spec accepts.
ANY_NUMBER = ThresholdSpec(finite=False)
#: A finite number > 0 (a learning rate, a limit on a ratio that may exceed 1).
POSITIVE = ThresholdSpec(low=0.0, low_open=True)
#: A ratio strictly between 0 and 1 (0 would never fire, 1 or more on healthy models).
RATIO = ThresholdSpec(low=0.0, high=1.0, low_open=True, high_open=True)
#: A share that something must exceed, in [0, 1) (1 could never be exceeded).
SHARE = ThresholdSpec(low=0.0, high=1.0, high_open=True)


def greater_than(low: float) -> ThresholdSpec:
    """A finite number > ``low``."""
    return ThresholdSpec(low=low, low_open=True)


def whole_at_least(low: int, *, at_most: str | None = None) -> ThresholdSpec:
    """A whole number >= ``low`` (``at_most``: not above that other threshold)."""
    return ThresholdSpec(low=low, whole=True, at_most=at_most)


#: Persistence settings every rule accepts next to its thresholds (monitored steps).
PERSISTENCE: dict[str, ThresholdSpec] = {
    "window": whole_at_least(1),
    "clear_after": whole_at_least(1),
    "cooldown": whole_at_least(1),
}


class Rule:
    """Base class of gradwatch rules (see the module docstring for an example)."""

    code: ClassVar[str] = ""
    slug: ClassVar[str] = ""
    severity: ClassVar[Severity] = "warning"
    summary: ClassVar[str] = ""
    explanation: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {}
    #: threshold name -> what it means, for ``gradwatch explain``
    threshold_docs: ClassVar[dict[str, str]] = {}
    #: threshold name -> the values it accepts; overrides outside it are a ValueError.
    #: A numeric threshold without a spec accepts any number but NaN.
    threshold_specs: ClassVar[dict[str, ThresholdSpec]] = {}
    #: monitored steps a condition must hold before it is announced (1: at once)
    window: ClassVar[int] = 3
    #: monitored steps without the condition before it is announced as resolved
    clear_after: ClassVar[int] = 3
    #: monitored steps after an announcement before a persisting condition is repeated
    cooldown: ClassVar[int] = 100
    worse_by: ClassVar[float] = 1.0
    #: judged also at steps the every-step sentinel measured off schedule (a surge, a
    #: NaN); only its conditions that fire at once (window 1) count there
    fast: ClassVar[bool] = False

    def __init__(self, **thresholds: Any) -> None:
        self.thresholds: dict[str, Any] = dict(self.defaults)
        names = [*self.defaults, *PERSISTENCE]
        unknown = sorted(set(thresholds) - set(names))
        if unknown:
            raise ValueError(
                f"{self.code} {self.slug} has no threshold {', '.join(map(repr, unknown))}; "
                f"valid names: {', '.join(sorted(names))}"
            )
        for name, value in thresholds.items():
            checked = self._checked(name, value)
            if name in PERSISTENCE:
                setattr(self, name, checked)
            else:
                self.thresholds[name] = checked
        for name, spec in self.threshold_specs.items():
            other = spec.at_most
            if other is None or name not in self.thresholds or other not in self.thresholds:
                continue
            if self.thresholds[name] > self.thresholds[other]:
                raise ValueError(
                    f"{self.code} {self.slug}: threshold {name!r} must be at most "
                    f"{other!r} ({self.thresholds[other]!r}), got {self.thresholds[name]!r}"
                )

    def _checked(self, name: str, value: Any) -> Any:
        spec = PERSISTENCE.get(name) or self.threshold_specs.get(name)
        if spec is None:
            default = self.defaults.get(name)
            if not _is_number(default):
                return value  # a custom rule's own kind of setting: its business
            spec = ANY_NUMBER
        try:
            return spec.check(value)
        except ValueError:
            doc = self.threshold_docs.get(name)
            raise ValueError(
                f"{self.code} {self.slug}: threshold {name!r} must be {spec.describe()}"
                f"{f' ({doc})' if doc else ''}; got {value!r}"
            ) from None

    def t(self, name: str) -> float:
        """The value of threshold ``name``."""
        return self.thresholds[name]

    def check(self, ctx: RuleContext) -> list[Condition] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # Rules that keep their own memory override these (saved in Lightning checkpoints).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.thresholds.items() if self.defaults.get(k) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"


# -- helpers shared by rules ---------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def matrix_layers(stats: StepStats) -> list[LayerStats]:
    """Dense weight-bearing layers with a gradient, in forward order: the depth profile."""
    cached = stats.__dict__.get("_matrix_layers")
    if cached is None:
        cached = [s for s in stats.by_depth(with_gradient=True) if s.kind in MATRIX_KINDS]
        stats.__dict__["_matrix_layers"] = cached
    return list(cached)


def gradients_finite(stats: StepStats) -> bool:
    """True when no layer's gradient norm is NaN/Inf (worked out once per step: several
    rules ask)."""
    cached = stats.__dict__.get("_gradients_finite")
    if cached is None:
        cached = stats.__dict__["_gradients_finite"] = all(s.grad_finite for s in stats)
    return cached


def edge_size(n: int) -> int:
    """How many layers make the 'early' (and the 'late') end of an n-layer profile."""
    return max(1, round(n / 4))


def format_layers(names: Sequence[str], limit: int = 4) -> str:
    shown = [display_name(name) for name in names[:limit]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def worst_severity(*severities: Severity) -> Severity:
    return max(severities, key=severity_rank)
