"""Runs the rules at each monitored step and applies persistence and hysteresis.

A condition becomes a finding only after it held for the rule's ``window`` of
consecutive monitored steps; it is announced once when it starts, again only when it
gets worse (by ``worse_by``) or after a ``cooldown``, and an ``info`` "resolved"
finding follows when it has been absent for ``clear_after`` judged steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..findings import Finding, severity_rank
from ..guard import Guard
from .base import Condition, Rule, RuleContext


@dataclass
class _Track:
    streak: int = 0
    absent: int = 0
    active: bool = False
    announced_score: float = 0.0
    announced_severity: str = "info"
    announced_at: int = 0  # engine tick of the last announcement
    first_step: int | None = None
    last_step: int | None = None
    resolved_step: int | None = None
    layers: tuple[str, ...] = ()
    severity: str = "info"


@dataclass(frozen=True)
class SummaryRow:
    """One line of the end-of-run summary."""

    code: str
    rule: str
    severity: str
    layers: tuple[str, ...]
    first_step: int
    last_step: int
    status: str  # "active" or "resolved"
    resolved_step: int | None = None


class RuleEngine:
    """Evaluates rules and remembers which conditions are announced."""

    def __init__(self, rules: Sequence[Rule], guard: Guard | None = None) -> None:
        self.rules = list(rules)
        self.guard = guard or Guard()
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._history_rows: dict[tuple[str, str, int], SummaryRow] = {}
        self._tick = 0

    def evaluate(self, ctx: RuleContext) -> list[Finding]:
        off_schedule = ctx.stats.trigger is not None
        if not off_schedule:
            self._tick += 1
        findings: list[Finding] = []
        for rule in self.rules:
            if off_schedule and not getattr(rule, "fast", False):
                continue
            part = f"rule {rule.code} {rule.slug}"
            conditions = self.guard.call(part, rule.check, ctx, default=None)
            if conditions is None:
                continue
            if off_schedule:
                # A sentinel's emergency measurement: only what fires at once counts, and
                # the persistence of everything else is left as it was.
                conditions = [c for c in conditions if (c.window or rule.window) == 1]
            findings.extend(self._apply(rule, conditions, ctx.stats.step, partial=off_schedule))
        return findings

    def _apply(
        self, rule: Rule, conditions: Sequence[Condition], step: int, partial: bool = False
    ) -> list[Finding]:
        out: list[Finding] = []
        seen: set[str] = set()
        for cond in conditions:
            if cond.key in seen:  # one condition per key and step
                continue
            seen.add(cond.key)
            track = self._tracks.setdefault((rule.slug, cond.key), _Track())
            track.streak += 1
            track.absent = 0
            severity = cond.severity or rule.severity
            if not track.active:
                if track.streak >= (cond.window or rule.window):
                    out.append(self._announce(rule, cond, track, step, severity, "new"))
                continue
            rose = severity_rank(severity) > severity_rank(track.announced_severity)
            if rose or cond.score >= track.announced_score + rule.worse_by:
                out.append(self._announce(rule, cond, track, step, severity, "worse"))
            elif self._tick - track.announced_at >= rule.cooldown:
                out.append(self._announce(rule, cond, track, step, severity, "reminder"))
            else:
                track.last_step = step
                self._record(rule, cond.key, track)
        for (slug, key), track in list(self._tracks.items()):
            if slug != rule.slug or key in seen or partial:
                continue
            track.streak = 0
            track.absent += 1
            if track.active and track.absent >= rule.clear_after:
                track.active = False
                track.resolved_step = step
                self._record(rule, key, track)
                out.append(
                    Finding(
                        code=rule.code,
                        rule=rule.slug,
                        severity="info",
                        step=step,
                        layers=track.layers,
                        message=f"resolved: {rule.summary} no longer seen "
                        f"(first at step {track.first_step}, last at step {track.last_step})",
                        hint="",
                        evidence={"first_step": track.first_step, "last_step": track.last_step},
                        status="resolved",
                    )
                )
            if not track.active:
                del self._tracks[(slug, key)]
        return out

    def _announce(
        self, rule: Rule, cond: Condition, track: _Track, step: int, severity: str, status: str
    ) -> Finding:
        if not track.active:
            track.first_step = step
            track.resolved_step = None
        track.active = True
        track.announced_score = cond.score
        track.announced_severity = severity
        track.announced_at = self._tick
        track.last_step = step
        track.layers = cond.layers
        track.severity = severity
        self._record(rule, cond.key, track)
        return Finding(
            code=rule.code,
            rule=rule.slug,
            severity=severity,  # type: ignore[arg-type]
            step=step,
            layers=cond.layers,
            message=cond.message,
            hint=cond.hint,
            evidence=dict(cond.evidence),
            status=status,  # type: ignore[arg-type]
        )

    def _record(self, rule: Rule, key: str, track: _Track) -> None:
        if track.first_step is None:
            return
        self._history_rows[(rule.slug, key, track.first_step)] = SummaryRow(
            code=rule.code,
            rule=rule.slug,
            severity=track.severity,
            layers=track.layers,
            first_step=track.first_step,
            last_step=track.last_step if track.last_step is not None else track.first_step,
            status="active" if track.active else "resolved",
            resolved_step=track.resolved_step,
        )

    def summary(self) -> list[SummaryRow]:
        """Every finding announced so far, as one row per episode, in order of first step."""
        return sorted(self._history_rows.values(), key=lambda r: (r.first_step, r.code))

    # -- checkpointing (Lightning resume) ----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tick": self._tick,
            "tracks": [
                {"slug": slug, "key": key, **asdict(track)}
                for (slug, key), track in self._tracks.items()
            ],
            "summary": [
                {"key": key, **asdict(row)} for (_, key, _), row in self._history_rows.items()
            ],
            "rules": {rule.slug: rule.state_dict() for rule in self.rules},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._tick = int(state.get("tick", 0))
        self._tracks = {}
        for item in state.get("tracks", []):
            item = dict(item)
            slug, key = item.pop("slug"), item.pop("key")
            item["layers"] = tuple(item.get("layers", ()))
            self._tracks[(slug, key)] = _Track(**item)
        self._history_rows = {}
        for item in state.get("summary", []):
            item = dict(item)
            key = item.pop("key", "")
            item["layers"] = tuple(item.get("layers", ()))
            row = SummaryRow(**item)
            self._history_rows[(row.rule, key, row.first_step)] = row
        rule_states = state.get("rules", {})
        for rule in self.rules:
            if rule.slug in rule_states:
                rule.load_state_dict(rule_states[rule.slug])
