"""Built-in rules, and how a watcher's rule set is chosen.

Rules are selected like ruff's: by code or code prefix (``"GW1"`` = every gradient-flow
rule) or by slug (``"dead-units"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..validation import string_list, threshold_table
from .attention_growth import AttentionLogitGrowth
from .base import (
    ANY_NUMBER,
    PERSISTENCE,
    POSITIVE,
    RATIO,
    SHARE,
    Condition,
    ModelFacts,
    Rule,
    RuleContext,
    ThresholdSpec,
    greater_than,
    whole_at_least,
)
from .carried import CarriedGradient
from .clamped_output import ClampedOutput
from .dead_units import DeadUnits
from .divergence import Diverging
from .engine import RuleEngine, SummaryRow
from .exploding import ExplodingGradient
from .loss_mismatch import LossInputMismatch
from .no_gradient import NoGradient
from .nonfinite import NonFiniteGradient
from .not_updated import NotUpdated
from .saturated_output import SaturatedOutput
from .saturation import SaturatedActivation
from .tiny_updates import TinyUpdates
from .vanishing import VanishingGradient
from .zero_gradient import ZeroGradient

BUILTIN_RULES: tuple[type[Rule], ...] = (
    VanishingGradient,
    ExplodingGradient,
    NonFiniteGradient,
    NoGradient,
    NotUpdated,
    Diverging,
    CarriedGradient,
    ZeroGradient,
    TinyUpdates,
    DeadUnits,
    SaturatedActivation,
    AttentionLogitGrowth,
    LossInputMismatch,
    ClampedOutput,
    SaturatedOutput,
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


_PATTERN = "a rule code, code prefix or slug"


def resolve_rules(
    rules: Rule | Sequence[Rule] | None = None,
    *,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Rule]:
    """Build the rule list of a watcher, checking every option (``ValueError`` names the
    option and what it accepts). Framework callbacks call it at construction so that
    their users get the same errors as :func:`gradwatch.watch` users.

    ``select``/``ignore``: codes, code prefixes or slugs (a single string is one item).
    ``thresholds`` maps a code or slug to overrides of the built-in rules, e.g.
    ``{"vanishing-gradient": {"ratio": 1e-4}}``; each value is checked against the
    rule's :attr:`~Rule.threshold_specs`. ``rules`` replaces the built-in set.

    >>> [r.code for r in resolve_rules(select=["GW1"], ignore="no-gradient")]
    ['GW101', 'GW102', 'GW103', 'GW105', 'GW106', 'GW107', 'GW108', 'GW109']
    >>> resolve_rules(thresholds={"GW101": {"ratio": -1}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: thresholds: GW101 vanishing-gradient: threshold 'ratio' must be a number in ...
    """
    table = threshold_table(thresholds)
    patterns = {
        "select": string_list("select", select, what=_PATTERN) or [],
        "ignore": string_list("ignore", ignore, what=_PATTERN) or [],
    }
    if rules is None:
        chosen: list[Rule] = []
        for cls in BUILTIN_RULES:
            overrides = {**table.pop(cls.code.lower(), {}), **table.pop(cls.slug, {})}
            try:
                chosen.append(cls(**overrides))
            except ValueError as error:
                raise ValueError(f"thresholds: {error}") from None
    else:
        chosen = rule_list(rules)
        if table:
            raise ValueError(
                "thresholds apply to the built-in rules; with rules=[...], give each rule "
                "its thresholds when you create it, e.g. VanishingGradient(ratio=1e-3)"
            )
    if table:
        raise ValueError(
            f"thresholds given for unknown rules {sorted(table)}; use a code or slug "
            f"from: {', '.join(f'{c.code} {c.slug}' for c in BUILTIN_RULES)}"
        )
    for option, items in patterns.items():
        for pattern in items:
            if not any(_matches(rule, pattern) for rule in chosen):
                raise ValueError(
                    f"{option}: {pattern!r} matches no rule; use a code, a code prefix or a "
                    f"slug from: {', '.join(f'{r.code} {r.slug}' for r in chosen)}"
                )
    if patterns["select"]:
        chosen = [r for r in chosen if any(_matches(r, p) for p in patterns["select"])]
    if patterns["ignore"]:
        chosen = [r for r in chosen if not any(_matches(r, p) for p in patterns["ignore"])]
    return chosen


def rule_list(rules: Rule | Iterable[Rule]) -> list[Rule]:
    """``rules=`` as a list of rule instances with distinct codes and slugs (a single
    rule is one item).

    >>> rule_list([VanishingGradient, NoGradient()])
    Traceback (most recent call last):
    ...
    ValueError: rules[0] is the class VanishingGradient; pass an instance: VanishingGradient()
    """
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Iterable):
        raise ValueError(
            f"rules must be a list of gradwatch.rules.Rule instances, got {rules!r}"
        )
    chosen = list(rules)
    seen: dict[str, int] = {}
    for position, rule in enumerate(chosen):
        if isinstance(rule, type) and issubclass(rule, Rule):
            raise ValueError(
                f"rules[{position}] is the class {rule.__name__}; pass an instance: "
                f"{rule.__name__}()"
            )
        if not isinstance(rule, Rule):
            raise ValueError(
                f"rules[{position}] must be a gradwatch.rules.Rule instance, "
                f"got {type(rule).__name__}"
            )
        if not rule.code or not rule.slug:
            raise ValueError(
                f"rules[{position}] ({type(rule).__name__}) needs a code and a slug "
                "(class attributes, e.g. code = 'X001', slug = 'my-rule')"
            )
        for name in (rule.code.lower(), rule.slug):
            if name in seen:
                raise ValueError(
                    f"rules[{position}] ({type(rule).__name__}) has the code or slug "
                    f"{name!r} of rules[{seen[name]}]; each rule needs its own"
                )
            seen[name] = position
    return chosen


__all__ = [
    "ANY_NUMBER",
    "BUILTIN_RULES",
    "PERSISTENCE",
    "POSITIVE",
    "RATIO",
    "SHARE",
    "AttentionLogitGrowth",
    "ClampedOutput",
    "Condition",
    "DeadUnits",
    "ExplodingGradient",
    "LossInputMismatch",
    "ModelFacts",
    "NoGradient",
    "NonFiniteGradient",
    "Rule",
    "RuleContext",
    "RuleEngine",
    "SaturatedActivation",
    "SaturatedOutput",
    "SummaryRow",
    "ThresholdSpec",
    "VanishingGradient",
    "ZeroGradient",
    "builtin_rules",
    "find_rule",
    "greater_than",
    "resolve_rules",
    "rule_list",
    "rule_matches",
    "whole_at_least",
]
