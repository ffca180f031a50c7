"""Built-in rules, and how a watcher's rule set is chosen.

Rules are selected like ruff's: by code or code prefix (``"GW1"`` = every gradient-flow
rule) or by slug (``"dead-units"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .attention_growth import AttentionLogitGrowth
from .base import Condition, ModelFacts, Rule, RuleContext
from .dead_units import DeadUnits
from .engine import RuleEngine, SummaryRow
from .exploding import ExplodingGradient
from .no_gradient import NoGradient
from .nonfinite import NonFiniteGradient
from .saturation import SaturatedActivation
from .vanishing import VanishingGradient

BUILTIN_RULES: tuple[type[Rule], ...] = (
    VanishingGradient,
    ExplodingGradient,
    NonFiniteGradient,
    NoGradient,
    DeadUnits,
    SaturatedActivation,
    AttentionLogitGrowth,
)


def builtin_rules() -> list[Rule]:
    """A fresh instance of every built-in rule, with default thresholds."""
    return [cls() for cls in BUILTIN_RULES]


def find_rule(name: str) -> type[Rule]:
    """The built-in rule class for a code (``"GW101"``) or slug (``"vanishing-gradient"``).

    >>> find_rule("gw101").slug
    'vanishing-gradient'
    """
    wanted = name.strip().lower()
    for cls in BUILTIN_RULES:
        if wanted in (cls.code.lower(), cls.slug):
            return cls
    known = ", ".join(f"{c.code} {c.slug}" for c in BUILTIN_RULES)
    raise ValueError(f"no rule named {name!r}; known rules: {known}")


def rule_matches(code: str, slug: str, pattern: str) -> bool:
    """True when ``pattern`` is the slug, the code or a prefix of the code.

    >>> rule_matches("GW101", "vanishing-gradient", "gw1")
    True
    """
    pattern = pattern.strip().lower()
    return slug == pattern or code.lower().startswith(pattern)


def _matches(rule: Rule | type[Rule], pattern: str) -> bool:
    return rule_matches(rule.code, rule.slug, pattern)


def resolve_rules(
    rules: Sequence[Rule] | None = None,
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Rule]:
    """Build the rule list of a watcher.

    ``thresholds`` maps a code or slug to keyword overrides, e.g.
    ``{"vanishing-gradient": {"ratio": 1e-4}}``.

    >>> [r.code for r in resolve_rules(select=["GW1"], ignore=["no-gradient"])]
    ['GW101', 'GW102', 'GW103']
    """
    thresholds = {key.strip().lower(): dict(value) for key, value in (thresholds or {}).items()}
    if rules is None:
        chosen: list[Rule] = []
        for cls in BUILTIN_RULES:
            overrides = thresholds.pop(cls.code.lower(), {})
            overrides.update(thresholds.pop(cls.slug, {}))
            chosen.append(cls(**overrides))
    else:
        chosen = list(rules)
        for rule in chosen:
            if not isinstance(rule, Rule):
                raise ValueError(
                    f"rules must be gradwatch.rules.Rule instances, got {type(rule).__name__}"
                )
    if thresholds:
        raise ValueError(
            f"thresholds given for unknown rules {sorted(thresholds)}; use a code or slug "
            f"from: {', '.join(f'{c.code} {c.slug}' for c in BUILTIN_RULES)}"
        )
    select = [s for s in (select or [])]
    ignore = [s for s in (ignore or [])]
    for pattern in (*select, *ignore):
        if not any(_matches(rule, pattern) for rule in chosen):
            raise ValueError(
                f"{pattern!r} matches no rule; use a code, a code prefix or a slug from: "
                f"{', '.join(f'{r.code} {r.slug}' for r in chosen)}"
            )
    if select:
        chosen = [r for r in chosen if any(_matches(r, p) for p in select)]
    if ignore:
        chosen = [r for r in chosen if not any(_matches(r, p) for p in ignore)]
    return chosen


__all__ = [
    "BUILTIN_RULES",
    "AttentionLogitGrowth",
    "Condition",
    "DeadUnits",
    "ExplodingGradient",
    "ModelFacts",
    "NoGradient",
    "NonFiniteGradient",
    "Rule",
    "RuleContext",
    "RuleEngine",
    "SaturatedActivation",
    "SummaryRow",
    "VanishingGradient",
    "builtin_rules",
    "find_rule",
    "resolve_rules",
    "rule_matches",
]
