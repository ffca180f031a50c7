"""Runs the rules at each monitored step and applies persistence and hysteresis.

A condition becomes a finding only after it held for the rule's ``window`` of
consecutive monitored steps; it is announced once when it starts, again only when it
gets worse (by ``worse_by``) or after a ``cooldown``, and an ``info`` "resolved"
finding follows when it has been absent for ``clear_after`` judged steps.

A condition that comes back after it was resolved (a NaN every few steps) flaps: it is
announced again, and from then on it is resolved only after an absence twice as long as
the gap it just came back after (at most ``cooldown``), so it does not flood the
reporters with new/resolved pairs.

Memory stays bounded however long training runs: one track per condition that is active
or was resolved within the last ``cooldown`` monitored steps, and one summary row per
condition and layers, however often it comes back (at most :data:`MAX_SUMMARY_ROWS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
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
    seen_at: int = 0  # engine tick when the condition was last seen
    resolved_at: int | None = None  # engine tick of the last "resolved" announcement
    hold: int = 0  # judged steps of absence before resolving a flapping condition
    row: tuple[str, ...] | None = None  # layers that key this episode's summary row


#: The most summary rows kept; beyond it the longest-resolved row is dropped.
MAX_SUMMARY_ROWS = 256


@dataclass(frozen=True)
class SummaryRow:
    """One line of the end-of-run summary: a problem (rule, condition and layers), from
    the first time it was announced to the last time it was seen. ``episodes`` counts
    how often it started again after being resolved, plus one."""

    code: str
    rule: str
    severity: str
    layers: tuple[str, ...]
    first_step: int
    last_step: int
    status: str  # "active" or "resolved"
    resolved_step: int | None = None
    episodes: int = 1


class RuleEngine:
    """Evaluates rules and remembers which conditions are announced."""

    def __init__(self, rules: Sequence[Rule], guard: Guard | None = None) -> None:
        self.rules = list(rules)
        self.guard = guard or Guard()
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._rows: dict[tuple[str, str, tuple[str, ...]], SummaryRow] = {}
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
            if not track.active and track.resolved_at is not None:
                # Back after "resolved": next time, wait out twice this gap first.
                gap = 2 * (self._tick - track.seen_at)
                track.hold = min(rule.cooldown, max(track.hold, rule.clear_after, gap))
            track.seen_at = self._tick
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
            if track.active and track.absent >= (track.hold or rule.clear_after):
                track.active = False
                track.resolved_step = step
                track.resolved_at = self._tick
                self._record(rule, key, track)
                out.append(
                    Finding(
                        code=rule.code,
                        rule=rule.slug,
                        severity="info",
                        step=step,
                        layers=track.layers,
                        message=f"resolved at step {step} (last seen at step "
                        f"{track.last_step})",
                        hint="",
                        evidence={"first_step": track.first_step, "last_step": track.last_step},
                        status="resolved",
                    )
                )
            # A resolved condition is remembered for a cooldown, to notice if it flaps.
            if not track.active and (
                track.resolved_at is None or self._tick - track.resolved_at >= rule.cooldown
            ):
                del self._tracks[(slug, key)]
        return out

    def _announce(
        self, rule: Rule, cond: Condition, track: _Track, step: int, severity: str, status: str
    ) -> Finding:
        starts = not track.active
        if starts:
            track.first_step = step
            track.resolved_step = None
            track.resolved_at = None
            track.row = cond.layers
        track.active = True
        track.announced_score = cond.score
        track.announced_severity = severity
        track.announced_at = self._tick
        track.last_step = step
        track.layers = cond.layers
        track.severity = severity
        self._record(rule, cond.key, track, starts=starts)
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

    def _record(self, rule: Rule, key: str, track: _Track, *, starts: bool = False) -> None:
        """Bring the summary row of ``track``'s condition up to date; ``starts``: a new
        episode begins (a first one, or the problem came back after it was resolved)."""
        if track.first_step is None:
            return
        row_key = (rule.slug, key, track.row if track.row is not None else track.layers)
        now = SummaryRow(
            code=rule.code,
            rule=rule.slug,
            severity=track.severity,
            layers=track.layers,
            first_step=track.first_step,
            last_step=track.last_step if track.last_step is not None else track.first_step,
            status="active" if track.active else "resolved",
            resolved_step=track.resolved_step,
        )
        before = self._rows.pop(row_key, None)  # re-inserted last: the newest rows last
        if before is not None:
            now = replace(
                now,
                severity=max(before.severity, now.severity, key=severity_rank),
                first_step=min(before.first_step, now.first_step),
                episodes=before.episodes + (1 if starts else 0),
            )
        self._rows[row_key] = now
        if len(self._rows) > MAX_SUMMARY_ROWS:
            resolved = [k for k, row in self._rows.items() if row.status != "active"]
            if resolved:  # insertion order: the first is the one least recently touched
                del self._rows[resolved[0]]

    def summary(self) -> list[SummaryRow]:
        """One row per problem announced so far (repeated episodes merged), in order of
        first step."""
        return sorted(self._rows.values(), key=lambda r: (r.first_step, r.code))

    # -- checkpointing (Lightning resume) ----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tick": self._tick,
            "tracks": [
                {"slug": slug, "key": key, **asdict(track)}
                for (slug, key), track in self._tracks.items()
            ],
            "summary": [
                {"key": key, "row": list(row_layers), **asdict(row)}
                for (_, key, row_layers), row in self._rows.items()
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
            if item.get("row") is not None:
                item["row"] = tuple(item["row"])
            self._tracks[(slug, key)] = _Track(**item)
        self._rows = {}
        for item in state.get("summary", []):
            item = dict(item)
            key = item.pop("key", "")
            item["layers"] = tuple(item.get("layers", ()))
            row_layers = tuple(item.pop("row", None) or item["layers"])
            row = SummaryRow(**item)
            before = self._rows.get((row.rule, key, row_layers))
            if before is not None:  # saved before episodes were merged: merge them now
                row = replace(
                    row,
                    first_step=min(before.first_step, row.first_step),
                    episodes=before.episodes + row.episodes,
                )
            self._rows[(row.rule, key, row_layers)] = row
        rule_states = state.get("rules", {})
        for rule in self.rules:
            if rule.slug in rule_states:
                rule.load_state_dict(rule_states[rule.slug])
