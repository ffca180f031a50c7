"""GW201 dead-units: a large share of a layer's ReLU units never activate, so they get no
gradient and cannot recover."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..kinds import ACTIVATION, RELU, SIGMOID, TANH, UNIT_ROW_KINDS
from ..stats import StepStats
from ..units import UnitGroup, alive_table, dead_fraction, shared_groups
from ..wording import alternatives, clip_gradients, display_name
from .base import SHARE, Condition, Rule, RuleContext, format_layers, whole_at_least


class DeadUnits(Rule):
    code = "GW201"
    slug = "dead-units"
    severity = "warning"
    summary = "a large share of a layer's ReLU units never activate"
    explanation = """\
What it measures: per unit (neuron or channel), whether it was active at all over the
last `span` monitored steps. Two sources, so it also works with functional F.relu and
compiled models: a ReLU module's output (a unit is active where it is > 0; ReLU6
strictly inside its range), and a Linear/Conv layer's weight gradient (a unit whose
weight-gradient row is exactly zero for every sample got no gradient). It fires when
more than `fraction` of a layer's units were inactive over the whole span, and is an
error when all of them were (nothing passes through that layer). The default, 60%, sits
above what deep plain ReLU networks show at a healthy He initialisation (up to ~50% in
their deepest layers, where inputs grow alike). Layers followed by a
sigmoid/tanh are left to GW202; layers with no gradient at all are left to GW101/GW104.

Why it matters: ReLU's derivative is 1 where the unit is active and 0 where it is not.
A unit whose pre-activation is negative for every input gets no gradient, so its
weights never change and it stays dead: the dying-ReLU problem. A large learning rate
can push many units there in a few steps; a large negative bias or badly scaled
inputs can start them there.

How to fix it: lower the learning rate (or warm it up); use LeakyReLU/GELU, which keep
a small gradient for negative inputs; add normalization before the activation;
re-initialise (kaiming) and check biases and input scaling."""
    defaults = {"fraction": 0.6, "span": 3}
    threshold_docs = {
        "fraction": "share of a layer's units inactive over the span above which it fires",
        "span": "monitored steps a unit must stay inactive to count as dead",
    }
    threshold_specs = {"fraction": SHARE, "span": whole_at_least(1)}
    window = 1  # the span already demands persistence
    clear_after = 3
    worse_by = 0.25

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        self._first_seen: dict[str, float] = {}
        self._flagged: set[str] = set()  # layers in the last verdict

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        span = max(1, int(self.t("span")))
        self._remember_start(ctx.stats)
        recent = ctx.recent(span)
        if len(recent) < span:
            return None
        if any(not math.isfinite(s.global_grad_norm) for s in recent):
            return None  # NaN makes every unit look dead; GW103 speaks for it
        flagged: list[tuple[UnitGroup, int, int, str]] = []
        judged = False
        groups = shared_groups(ctx.stats)
        tables = [alive_table(stats, groups) for stats in recent]
        fraction = self.t("fraction")
        for group in groups:
            dead = self._dead(group, tables)
            if dead is None:
                if group.name in self._flagged:
                    return None  # a flagged layer went out of sight: no verdict this step
                continue
            judged = True
            n_dead, size, sources = dead
            if n_dead / size > fraction:
                flagged.append((group, n_dead, size, ",".join(sorted(sources))))
        if not judged:
            return None
        self._flagged = {group.name for group, *_ in flagged}
        if not flagged:
            return []
        layers = [n for g, *_ in flagged for n in (g.producer, g.activation) if n is not None]
        total_dead = sum(d for _, d, _, _ in flagged)
        total = sum(s for _, _, s, _ in flagged)
        fully = [g.name for g, d, s, _ in flagged if d == s]
        parts = [f"{display_name(g.name)} {d}/{s} ({100 * d / s:.0f}%)" for g, d, s, _ in flagged]
        worst = max(flagged, key=lambda f: f[1] / f[2])[0]
        kinds = sorted({a for g, *_ in flagged if (a := activation_of(ctx, g)) is not None})
        what = f"dead {'/'.join(kinds)} units" if kinds else "dead units"
        message = (
            f"{len(flagged)} layer(s) with {what} (inactive over the last {span} "
            f"monitored steps): {format_layers(parts)}"
        )
        if fully:
            message += f"; all units dead in {format_layers(fully)}: no gradient passes"
        return [
            Condition(
                layers=tuple(layers),
                message=message,
                hint=self._hint(ctx, flagged),
                evidence={
                    "dead_units": total_dead,
                    "units": total,
                    "dead_fraction": total_dead / total if total else 0.0,
                    "layers_flagged": len(flagged),
                    "worst_layer": worst.name,
                    "source": ",".join(sorted({f[3] for f in flagged})),
                },
                severity="error" if fully else None,
                score=total_dead / total if total else 0.0,
            )
        ]

    def _remember_start(self, stats: StepStats) -> None:
        """Each layer's dead share the first time it is seen: units that were alive then
        and are dead now died during training."""
        if not math.isfinite(stats.global_grad_norm):
            return
        for group in shared_groups(stats):
            if group.name in self._first_seen:
                continue
            share = dead_fraction(group, stats)
            if share is not None:
                self._first_seen[group.name] = share

    def _dead(self, group: UnitGroup, tables: list[dict]) -> tuple[int, int, set[str]] | None:
        """(dead units, layer size, sources) over the span, or None if it cannot be judged.

        Each step contributes the units it saw alive: from the ReLU's output where it was
        hooked, else from the producer's non-zero gradient rows (a layer with no gradient
        at all cannot be judged: that is vanishing or missing gradient, not dead units).
        ``tables`` are :func:`~gradwatch.units.alive_table` of the steps of the span.
        """
        bits, size = 0, None
        sources: set[str] = set()
        key = (group.producer, group.activation)
        for table in tables:  # the union of the alive units, as plain ints (a mask per
            seen = table[key]  # layer and step would cost more than this)
            if seen is None:
                return None
            alive, units, source = seen
            if size is not None and size != units:
                return None
            bits |= alive
            size = units
            sources.add(source)
        if not size:
            return None
        return size - bits.bit_count(), size, sources  # named only for flagged layers

    def _hint(self, ctx: RuleContext, flagged: list) -> str:
        info = ctx.stats.optimizer
        lr = f" (lr={info.lr:g})" if info is not None else ""
        died = [
            g.name
            for g, *_ in flagged
            if self._first_seen.get(g.name, 1.0) <= self.t("fraction") / 2
        ]
        # Advise only activations the model does not use already.
        others = alternatives(ctx.model)
        leaky = (
            f", or use {'/'.join(others)}, which keep{'s' if len(others) == 1 else ''} a "
            "gradient for negative inputs"
            if others
            else ""
        )
        if died:
            return (
                f"Units in {format_layers(died)} were alive at first and died during "
                f"training: the learning rate is likely too high{lr}. Lower it or warm it "
                f"up, {clip_gradients(ctx.model.framework)}{leaky}."
            )
        return (
            "These units were dead from the first monitored steps: their pre-activations "
            "are negative for every input. Check the biases (a large negative bias kills "
            f"a layer), the input scaling and the initialisation (kaiming){leaky}; "
            "normalization before the activation keeps pre-activations centred."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"first_seen": dict(self._first_seen), "flagged": sorted(self._flagged)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._first_seen = dict(state.get("first_seen", {}))
        self._flagged = set(state.get("flagged", []))


def activation_of(ctx: RuleContext, group: UnitGroup) -> str | None:
    """The class of the activation after a group's units (``ReLU``, ``GELU``, ...): its
    own activation module, else the first module after the producer in forward order
    that is not a weight layer; None when the activation is functional (``F.relu``)."""
    classes = ctx.model.classes
    if group.activation is not None:
        return classes.get(group.activation, "ReLU")
    ordered = ctx.stats.by_depth()
    names = [s.name for s in ordered]
    if group.producer not in names:
        return None
    for layer in ordered[names.index(group.producer) + 1 :]:
        if layer.kind in UNIT_ROW_KINDS:
            break
        if layer.kind in _ACTIVATION_KINDS:
            return classes.get(layer.name)
    # Not measured as a layer of its own: the model's one gating activation, if it has one.
    used = [name for name in _GATING if ctx.model.uses(name)]
    return used[0] if len(used) == 1 else None


_ACTIVATION_KINDS = (RELU, ACTIVATION, SIGMOID, TANH)
#: Activation modules whose units can stop passing gradient for negative inputs.
_GATING = ("ReLU", "ReLU6", "GELU", "SiLU", "ELU", "SELU", "CELU", "Mish", "Softplus",
           "Hardswish", "Hardtanh")
