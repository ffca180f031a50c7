"""GW102 exploding-gradient: gradients grow with depth, dwarf the weights they update,
or jump far above their recent level."""

from __future__ import annotations

import math
from dataclasses import replace

from ..stats import StepStats
from ..wording import capitalised, clip_gradients, display_name
from .base import (
    POSITIVE,
    RATIO,
    Condition,
    Rule,
    RuleContext,
    format_layers,
    gradients_finite,
    greater_than,
    matrix_layers,
    median,
    whole_at_least,
)
from .profile import build_profile, signal_profile
from .recurrent import has_recurrent, through_time, time_step_hint
from .updates import stuck_layers


class ExplodingGradient(Rule):
    code = "GW102"
    slug = "exploding-gradient"
    severity = "warning"
    summary = "gradients grow with depth, dwarf the weights, or spike far above their recent level"
    explanation = """\
What it measures, five ways (each must hold for `window` monitored steps unless it says
"at once"):
- growth with depth: the gradient flowing back into each weight layer's output (its
  RMS; the weight-gradient RMS where that is not observed, whatever the optimizer) in
  the first quarter of layers is more than 1/`ratio` times that of the last quarter (at
  once on the first monitored step: that is the initialisation);
- updates larger than the weights: for SGD-like optimizers, lr * |grad| / |weight| of
  a weight layer above `update_ratio` (with the optimizer unknown, lr is taken as
  `assumed_lr`; Adam-like optimizers bound their steps by lr, so for them the step is
  judged from the measured update instead: GW106).
  When at least half of the weight layers (of ordinary scale, gain >= 0.1) exceed it,
  it is announced at once, without the window: such a step ruins the weights, and
  waiting would only report the NaN that follows; above 10x it is an error;
- a spike: the global gradient norm above `spike_factor` times the median of the
  previous monitored steps, held for `window` steps; at once above `spike_at_once`
  times (a corrupted batch: under Adam its trace stays in the second moment for
  thousands of steps);
- a surge, at once: between monitored steps a cheap check reads a small sample of
  gradients every step; when it jumps above `spike_factor` times its median over the
  last 16 steps, the whole model is measured at that step and this fires without the
  window, naming the layers whose gradient grew most since the last measurement. It
  comes before the NaN that a diverging run produces a few steps later;
- through time: a recurrent layer (nn.RNN/LSTM/GRU or a cell) whose hidden-to-hidden
  (weight_hh) gradient per input unit (its norm over the square root of its columns)
  is above `time_ratio` times the median of the weight layers after it. The hidden
  state that weight_hh multiplies is bounded, as is the input of the layers after it,
  so healthy recurrent classifiers and language models measure at most ~5x; far above
  that, the gradient of early time steps multiplies up once per step.
A jump is announced at once only above twice every gradient norm of the monitored
steps kept in the history: when the data changes (a curriculum), the gradient returns
to about its size early in training, and that is no divergence. Layers the optimizer
does not update (GW105) are left out: their gradient piles up when zero_grad() clears
only the optimizer's parameters.

Why it matters: backpropagation multiplies one local derivative per layer; weights
initialised too large (or a learning rate that inflates them) make that product grow
geometrically with depth. Activations and gradients then overflow, the loss jumps, and
NaN follows (GW103).

How to fix it: clip gradients (torch.nn.utils.clip_grad_norm_, or gradient_clip_val in
Lightning), lower the learning rate or warm it up, initialise with kaiming/xavier
(not larger), add normalization (BatchNorm/LayerNorm) or residual scaling. Through
time: clip gradients, initialise weight_hh orthogonally or as a scaled identity (gain
at most 1), use LSTM/GRU instead of a vanilla RNN, or backpropagate through fewer time
steps (truncated BPTT).

When it stays silent: through time, on healthy RNN/LSTM/GRU classifiers (their
weight_hh gradient is of the order of the head's); NaN/Inf gradients are GW103's."""
    defaults = {
        "ratio": 1e-3,
        "update_ratio": 1.0,
        "assumed_lr": 1e-2,
        "spike_factor": 20.0,
        "baseline_steps": 8,
        "min_baseline": 4,
        "min_layers": 3,
        "time_ratio": 100.0,
        "spike_at_once": 100.0,
    }
    threshold_docs = {
        "ratio": "late/early ratio of the gradient at layer outputs below which growth fires",
        "update_ratio": "lr * |grad| / |weight| of one layer above which a step is too large",
        "assumed_lr": "learning rate assumed when the optimizer is not known",
        "spike_factor": "global norm / median of recent steps above which it is a spike",
        "baseline_steps": "how many earlier monitored steps make the spike baseline",
        "min_baseline": "fewest earlier monitored steps before spikes are judged",
        "min_layers": "fewest weight layers for a depth comparison",
        "time_ratio": "recurrent weight_hh gradient per input unit / that of the layers after "
        "it above which the gradient explodes through time",
        "spike_at_once": "global norm / median of recent steps above which a spike is "
        "announced at once",
    }
    threshold_specs = {
        "ratio": RATIO,
        "update_ratio": POSITIVE,
        "assumed_lr": POSITIVE,
        "spike_factor": greater_than(1.0),
        "baseline_steps": whole_at_least(1),
        "min_baseline": whole_at_least(1, at_most="baseline_steps"),
        "min_layers": whole_at_least(2),
        "time_ratio": greater_than(1.0),
        "spike_at_once": greater_than(1.0),
    }
    window = 3
    worse_by = 1.0
    fast = True

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        if not gradients_finite(stats) or not math.isfinite(stats.global_grad_norm):
            return None  # GW103's business
        hint = (
            f"{capitalised(clip_gradients(ctx.model.framework))}, lower or warm up the "
            "learning rate, and check the initialisation (kaiming/xavier, not larger); "
            "normalization layers help."
        )
        out: list[Condition] = []
        update = self._update(ctx, hint)  # first: a step larger than the weights is worse
        if update is not None and has_recurrent(ctx, update.layers):
            update = replace(
                update,
                hint=time_step_hint(ctx, list(update.layers))
                + " Until then, a lower learning rate keeps one step from ruining the weights.",
            )
        if update is not None:
            out.append(update)
        # Through time is the more precise reading of growth in a recurrent layer.
        time = through_time(ctx, self.t("time_ratio"))
        growth = self._growth(ctx, hint) if time is None else time
        if growth is not None:
            out.append(growth)
        spike = self._spike(ctx, hint)
        if spike is not None:
            out.append(spike)
        surge = self._surge(ctx, hint)
        if surge is not None:
            out.append(surge)
        return out

    def _surge(self, ctx: RuleContext, hint: str) -> Condition | None:
        """The every-step sentinel saw the gradient jump: measured at that very step, so
        the finding comes before the weights are ruined (and before the NaN)."""
        stats = ctx.stats
        factor = stats.surge
        if stats.trigger != "surge" or factor is None or factor <= self.t("spike_factor"):
            return None
        if not _above_all_before(ctx, stats.global_grad_norm):
            return None
        earlier = next(
            (
                s
                for s in reversed(ctx.recent(int(self.t("baseline_steps")) + 1)[:-1])
                if math.isfinite(s.global_grad_norm) and s.trigger is None
            ),
            None,
        )
        growth: list[tuple[float, str]] = []
        for layer in stats.by_depth(with_gradient=True):
            before = earlier.layers.get(layer.name) if earlier is not None else None
            if before is not None and before.grad_norm and layer.grad_norm:
                growth.append((layer.grad_norm / before.grad_norm, layer.name))
        growth.sort(reverse=True)
        names = [name for _, name in growth[:3]]
        evidence: dict[str, object] = {
            "factor": factor,
            "global_grad_norm": stats.global_grad_norm,
        }
        where = ""
        if earlier is not None and growth:
            evidence["since_step"] = earlier.step
            evidence["largest_growth"] = growth[0][0]
            evidence["largest_growth_layer"] = growth[0][1]
            evidence["global_growth"] = (
                stats.global_grad_norm / earlier.global_grad_norm
                if earlier.global_grad_norm
                else math.inf
            )
            where = (
                f"; largest growth since step {earlier.step} in {format_layers(names)} "
                f"({growth[0][0]:.3g}x in {display_name(growth[0][1])})"
            )
        return Condition(
            key="surge",
            layers=tuple(names),
            message=(
                f"the gradient jumped to {factor:.3g}x its median over the last steps "
                f"(global gradient norm {stats.global_grad_norm:.3g}){where}: training is "
                "diverging"
            ),
            hint=(
                "A sudden jump of the gradient is how divergence starts (NaN follows within "
                "a few steps): " + hint[0].lower() + hint[1:]
            ),
            evidence=evidence,
            severity="error" if factor > 10 * self.t("spike_factor") else None,
            score=math.log10(factor),
            window=1,
        )

    def _growth(self, ctx: RuleContext, hint: str) -> Condition | None:
        min_layers = int(self.t("min_layers"))
        profile = signal_profile(ctx.stats, min_layers)
        source = "backward signal"
        if profile is None:
            # The gradient's own size, whatever the optimizer: growth with depth is a
            # pathology of the network (Adam would hide it in its steps, not cure it).
            # Layers the optimizer does not update are left out: their gradient piles up.
            stuck = stuck_layers(ctx)
            layers = [
                s
                for s in matrix_layers(ctx.stats)
                if s.grad_rms is not None and s.name not in stuck
            ]
            profile = build_profile(layers, [s.grad_rms or 0.0 for s in layers], min_layers)
            source = "gradient RMS"
            if profile is None:
                return None
        if profile.early <= 0 or profile.late <= 0:
            return None
        growth = profile.early / profile.late
        if growth <= 1.0 / self.t("ratio"):
            return None
        limit = profile.late / self.t("ratio")
        names = [s.name for s, v in zip(profile.layers, profile.values) if v > limit]
        return Condition(
            key="depth",
            layers=tuple(names),
            message=(
                f"{source} grows {growth:.2g}x from the last layers to the first "
                f"({profile.late:.2g} -> {profile.early:.2g}) in {format_layers(names)}"
            ),
            hint=hint,
            evidence={
                "growth": growth,
                "early_rms": profile.early,
                "late_rms": profile.late,
                "measure": source,
            },
            score=math.log10(growth),
            # The first monitored step shows the initialisation itself, not a noisy moment
            # of training: growth with depth there is announced at once, before the first
            # steps (SGD at any lr, Adam) rewrite the weights and hide it.
            window=1 if len(ctx.history) <= 1 else None,
        )

    def _update(self, ctx: RuleContext, hint: str) -> Condition | None:
        info = ctx.stats.optimizer
        if info is not None and info.adaptive:
            return None
        lr = info.lr if info is not None else self.t("assumed_lr")
        if lr <= 0:
            return None
        flagged: list[tuple[str, float]] = []
        ordinary_scale = False
        stuck = stuck_layers(ctx)  # their gradient is never applied: no step to judge
        layers = [s for s in matrix_layers(ctx.stats) if s.name not in stuck]
        limit = self.t("update_ratio")
        for layer in layers:
            weight = layer.param_rms  # the latest measured (carried between detail steps)
            if not weight or layer.grad_rms is None:
                continue  # a zero-initialised layer has no scale to compare with yet
            ratio = lr * layer.grad_rms / weight
            if ratio > limit:
                flagged.append((layer.name, ratio))
                # Layers initialised deliberately tiny (gain < 0.1, e.g. a zero-ish output
                # head) may grow by more than their size at first: that alone is no alarm.
                gain = weight * math.sqrt(layer.fan_in) if layer.fan_in else 1.0
                ordinary_scale = ordinary_scale or gain >= 0.1
        if not flagged:
            return None
        worst = max(r for _, r in flagged)
        extreme = worst > 10 * self.t("update_ratio")
        names = [n for n, _ in flagged]
        # Network-wide, it is an explosion in progress; one layer alone (say, an output
        # layer facing a large initial loss) must persist before it is announced.
        broad = len(flagged) * 2 >= len(layers)
        lr_text = f"lr={lr:g}" if info is not None else f"an assumed lr={lr:g}"
        return Condition(
            key="update",
            layers=tuple(names),
            message=(
                f"one optimizer step would change the weights of {format_layers(names)} by "
                f"up to {worst:.3g}x their own size ({lr_text}; global gradient norm "
                f"{ctx.stats.global_grad_norm:.3g})"
            ),
            hint=hint,
            evidence={
                "max_update_ratio": worst,
                "lr": lr,
                "lr_known": info is not None,
                "global_grad_norm": ctx.stats.global_grad_norm,
            },
            severity="error" if extreme else None,
            score=math.log10(worst),
            # A step larger than the weights ruins them at once: waiting for the window
            # would only report the NaN that follows.
            window=1 if ordinary_scale and broad else None,
        )

    def _spike(self, ctx: RuleContext, hint: str) -> Condition | None:
        earlier = ctx.recent(int(self.t("baseline_steps")) + 1)[:-1]
        # Gradients that the optimizer never applies pile up (zero_grad() clears only the
        # optimizer's parameters): the spike is judged on the rest.
        stuck = stuck_layers(ctx)
        norms = [_applied_norm(s, stuck) for s in earlier if math.isfinite(s.global_grad_norm)]
        if len(norms) < int(self.t("min_baseline")):
            return None
        baseline = median(norms)
        now = _applied_norm(ctx.stats, stuck)
        if baseline <= 0 or now <= self.t("spike_factor") * baseline:
            return None
        factor = now / baseline
        ranked = sorted(
            (
                s
                for s in ctx.stats.by_depth(with_gradient=True)
                if s.grad_norm and s.name not in stuck
            ),
            key=lambda s: -(s.grad_norm or 0.0),
        )
        names = [s.name for s in ranked[:3]]
        return Condition(
            key="spike",
            layers=tuple(names),
            message=(
                f"global gradient norm {now:.3g} is {factor:.3g}x its recent median "
                f"({baseline:.3g}); largest in {format_layers(names)}"
            ),
            hint=hint,
            evidence={"global_grad_norm": now, "baseline": baseline, "factor": factor},
            score=math.log10(factor),
            # A jump far above the recent level is a bad batch or the start of a divergence
            # whatever the optimizer (Adam's second moment keeps its trace for thousands of
            # steps): waiting for it to last would miss a single corrupted batch.
            window=1
            if factor > self.t("spike_at_once") and _above_all_before(ctx, now)
            else None,
        )


def _above_all_before(ctx: RuleContext, norm: float) -> bool:
    """A jump is news at once only well above (twice) every gradient norm of the earlier
    monitored steps kept in the history: when the data changes (a curriculum's next
    stage, a new task), the gradient jumps back to about the size it had early in
    training, which is no divergence; a corrupted batch or a diverging step goes far
    beyond it."""
    earlier = [
        s.global_grad_norm
        for s in ctx.history
        if s is not ctx.stats and math.isfinite(s.global_grad_norm)
    ]
    return not earlier or norm > 2.0 * max(earlier)


def _applied_norm(stats: StepStats, stuck: set[str]) -> float:
    """The global gradient norm without the layers named in ``stuck``."""
    norm = stats.global_grad_norm
    if not stuck:
        return norm
    removed = sum(
        (layer.grad_norm or 0.0) ** 2 for name in stuck if (layer := stats.layers.get(name))
    )
    return math.sqrt(max(norm * norm - removed, 0.0))
