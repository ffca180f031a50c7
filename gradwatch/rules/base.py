"""The rule protocol: a :class:`Rule` looks at a monitored step and returns
:class:`Condition`\\ s; the engine turns persistent conditions into findings.

Writing a rule takes a code, a slug, a docstring-like explanation, default thresholds
and a ``check`` method::

    from gradwatch.rules import Condition, Rule

    class TinyLoss(Rule):
        code = "X001"
        slug = "huge-global-norm"
        summary = "the global gradient norm is above a fixed limit"
        explanation = "What, why, how to fix ..."
        defaults = {"limit": 1e3}

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

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..findings import Severity, severity_rank
from ..history import History
from ..kinds import MATRIX_KINDS, NORM
from ..stats import LayerStats, StepStats

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

    @classmethod
    def from_layers(
        cls, layers: Sequence[LayerInfo], all_classes: frozenset[str], compiled: bool = False
    ) -> ModelFacts:
        kinds = Counter(layer.kind for layer in layers)
        return cls(
            kinds=kinds,
            activation_classes=all_classes,
            has_normalization=kinds.get(NORM, 0) > 0
            or any("Norm" in name for name in all_classes),
            matrix_layers=sum(kinds.get(k, 0) for k in MATRIX_KINDS),
            compiled=compiled,
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
        """The last ``n`` monitored steps including this one, oldest first."""
        return self.history.last(n)


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
    #: monitored steps a condition must hold before it is announced (1: at once)
    window: ClassVar[int] = 3
    #: monitored steps without the condition before it is announced as resolved
    clear_after: ClassVar[int] = 3
    #: monitored steps after an announcement before a persisting condition is repeated
    cooldown: ClassVar[int] = 100
    worse_by: ClassVar[float] = 1.0

    def __init__(self, **thresholds: float) -> None:
        unknown = set(thresholds) - set(self.defaults) - {"window", "clear_after", "cooldown"}
        if unknown:
            valid = ", ".join(sorted([*self.defaults, "window", "clear_after", "cooldown"]))
            raise ValueError(
                f"{self.code} {self.slug} has no threshold {', '.join(sorted(unknown))}; "
                f"valid names: {valid}"
            )
        for name in ("window", "clear_after", "cooldown"):
            if name in thresholds:
                value = int(thresholds.pop(name))
                if value < 1:
                    raise ValueError(f"{self.slug}: {name} must be >= 1, got {value}")
                setattr(self, name, value)
        self.thresholds: dict[str, float] = {**self.defaults, **thresholds}

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


def edge_size(n: int) -> int:
    """How many layers make the 'early' (and the 'late') end of an n-layer profile."""
    return max(1, round(n / 4))


def format_layers(names: Sequence[str], limit: int = 4) -> str:
    shown = [name or "<root>" for name in names[:limit]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def worst_severity(*severities: Severity) -> Severity:
    return max(severities, key=severity_rank)
