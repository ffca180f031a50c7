"""GW101 vanishing-gradient: the early layers get orders of magnitude less gradient than
the late ones, so they barely learn."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..kinds import SATURATING_KINDS, SIGMOID, TANH
from ..stats import StepStats
from ..units import mostly_dead, recent_blockers
from ..wording import display_name
from .base import (
    RATIO,
    Condition,
    Rule,
    RuleContext,
    format_layers,
    gradients_finite,
    whole_at_least,
)
from .profile import (
    FLOAT32_RESOLUTION,
    HE_GAIN,
    TANH_GAIN,
    Profile,
    activation_names,
    find_cuts,
    gradient_profile,
    has_relu,
    init_gain,
    signal_profile,
)
from .updates import stuck_layers

#: Monitored steps judged at the start: healthy on all of them means "healthy at first".
_START_STEPS = 2


class VanishingGradient(Rule):
    code = "GW101"
    slug = "vanishing-gradient"
    severity = "warning"
    summary = "early layers get gradients orders of magnitude below later layers"
    explanation = """\
What it measures: the gradient RMS (norm / sqrt(size), so layers of different sizes
compare) of every weight layer (Linear, Conv, attention), in the order the forward pass
runs them. It compares the median of the first quarter of layers with the median of
the last quarter. With an Adam-like optimizer it compares relative step sizes instead,
rms / (rms + eps): Adam rescales every gradient, so only one that sinks towards eps
stops a layer. It fires when the early/late ratio stays below `ratio` for `window`
monitored steps, and is an error when the early updates are below float32 resolution
(w - lr*g == w) or exactly zero.
Layers that separate optimizers update (a GAN's generator and discriminator watched as
one module, learned from the loop's optimizer steps) are compared only with the layers
of their own optimizer: separate losses give the two networks unrelated gradient scales.

Vanishing fades: each layer gets a fraction of what the next one gets, so the layers
next to an exactly-zero gradient are starved too (a 30-layer sigmoid stack has ~1e-21
of the late gradient there). Where the gradient instead drops from normal to exactly
zero at once, an operation blocks it (rounding, argmax, detach): those layers are
reported as a blocked gradient under GW104, and only the layers after the blocking
operation are compared here.

Why it matters: backpropagation multiplies one local derivative per layer. The
sigmoid's derivative is at most 0.25, so 30 sigmoid layers scale the gradient by at
most 0.25^30 ~ 8.7e-19: the first layers get nothing and never move. ReLU's derivative
is 1 or 0, which does not shrink the product by itself, but weights that are too small
(PyTorch's default init has gain 0.58, He init sqrt(2)) shrink it at every layer: a
30-layer ReLU MLP with default init measures a first/last ratio near 1e-11 on digits.
A residual connection (out = F(x) + x) adds a +1 path to each derivative, so a
gradient reaches the early layers even when dF/dx vanishes.

How to fix it: replace sigmoid/tanh hidden activations with ReLU-family or GELU;
initialise ReLU networks with kaiming (He) init; add residual connections or
normalization (BatchNorm, LayerNorm); with many layers, do both."""
    defaults = {"ratio": 1e-2, "min_layers": 3}
    threshold_docs = {
        "ratio": "early/late ratio of (median) gradient RMS below which it fires",
        "min_layers": "fewest weight layers for a depth comparison",
    }
    threshold_specs = {"ratio": RATIO, "min_layers": whole_at_least(2)}
    window = 3
    worse_by = 2.0  # two more orders of magnitude

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        if not gradients_finite(stats):
            return None  # GW103's business
        # Layers behind a cut get no gradient because an operation blocks it, not because
        # it fades: that is GW104's finding; the layers after the cut are judged here.
        cut_off = {name for cut in find_cuts(stats, ctx.recent(16)) for name in cut.blocked}
        # Layers the optimizer never updates pile up gradient when zero_grad() clears
        # only the optimizer's parameters: no yardstick for the others (GW105's finding).
        cut_off |= stuck_layers(ctx)
        profile = _worst_per_optimizer(stats, int(self.t("min_layers")), cut_off)
        if profile is None:
            return []
        if profile.late <= 0:
            return None  # no gradient at the top either: nothing to compare against
        ratio = profile.ratio
        self._remember_start(ctx.stats.step, ratio)
        if ratio >= self.t("ratio"):
            return []
        limit = self.t("ratio") * profile.late
        starved = [s for s, v in zip(profile.layers, profile.values) if v < limit]
        blockers = recent_blockers(ctx.recent(16))
        if blockers and starved:
            deepest = max(g.depth for g in blockers)
            if all((s.depth if s.depth is not None else 0.0) <= deepest for s in starved):
                return []  # a layer of dead units blocks the gradient: GW201's finding
        # The starved block that matters starts at the input side.
        names = [s.name for s in starved]
        first, last = profile.layers[0], profile.layers[-1]
        frozen, why_frozen = self._frozen(ctx, profile, starved)
        evidence: dict[str, object] = {
            "ratio": ratio,
            "early_rms": profile.early,
            "late_rms": profile.late,
            "first_layer": first.name,
            "first_layer_grad_rms": first.grad_rms,
            "last_layer": last.name,
            "last_layer_grad_rms": last.grad_rms,
            "starved_layers": len(starved),
            "weight_layers": len(profile.layers),
        }
        signal = signal_profile(stats, int(self.t("min_layers")))
        if signal is not None:
            evidence["backward_signal_ratio"] = signal.ratio
        if stats.optimizer is not None:
            evidence["optimizer"] = stats.optimizer.name
        gain = init_gain(profile.layers[:-1] or profile.layers)
        if gain is not None:
            evidence["init_gain"] = gain
        orders = -math.log10(ratio) if ratio > 0 else math.inf
        message = (
            f"the first layers' gradient RMS is {_ratio_text(ratio)} x the last layers' "
            f"({profile.early:.2g} vs {profile.late:.2g}); {len(starved)} of "
            f"{len(profile.layers)} weight layers get less than {self.t('ratio'):g} of it "
            f"({format_layers(names)})"
        )
        if frozen:
            message += f"; {why_frozen}"
        return [
            Condition(
                layers=tuple(names),
                message=message,
                hint=self._hint(ctx, profile, signal, gain, self._healthy_start()),
                evidence=evidence,
                severity="error" if frozen else "warning",
                score=min(orders, 60.0),
            )
        ]

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        #: (step, ratio) of the first monitored steps judged: a gradient that reached the
        #: first layers then and collapsed later was brought down by training, not init.
        self._start: list[tuple[int, float]] = []

    def _remember_start(self, step: int, ratio: float) -> None:
        if len(self._start) < _START_STEPS and all(step != s for s, _ in self._start):
            self._start.append((step, ratio))

    def _healthy_start(self) -> tuple[int, float] | None:
        """(step, ratio) of the first judged step, when every one of the first judged
        steps had a healthy ratio (this finding then appeared during training)."""
        if len(self._start) < _START_STEPS:
            return None
        if all(r >= self.t("ratio") for _, r in self._start):
            return self._start[0]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"start": [list(item) for item in self._start]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._start = [(int(step), float(r)) for step, r in state.get("start", [])]

    def _frozen(self, ctx: RuleContext, profile: Profile, starved: list) -> tuple[bool, str]:
        early = profile.layers[: profile.k]
        if all((s.grad_rms or 0.0) == 0.0 for s in early):
            return True, "the first layers' gradient is exactly 0: their weights cannot change"
        info = ctx.stats.optimizer
        if info is None or info.lr <= 0:
            return False, ""
        for layer in early:
            weight = layer.param_rms  # the latest measured (carried between detail steps)
            if not weight:
                return False, ""
            rms = layer.grad_rms or 0.0
            step = info.lr * rms / info.eps if info.adaptive and info.eps else info.lr * rms
            if step >= FLOAT32_RESOLUTION * weight:
                return False, ""
        return True, "their updates are below float32 resolution of the weights (w - lr*g == w)"

    def _hint(
        self,
        ctx: RuleContext,
        profile: Profile,
        signal: Profile | None,
        gain: float | None,
        healthy_start: tuple[int, float] | None = None,
    ) -> str:
        hints: list[str] = []
        saturating = activation_names(ctx.stats, SATURATING_KINDS)
        dead = mostly_dead(ctx.recent(16))
        if healthy_start is not None:
            # The same network passed the gradient at first: its activations and init
            # were fine then. Training changed it (weights grown into saturation, units
            # pushed dead by large steps): advising the init it already has misleads.
            step, ratio = healthy_start
            info = ctx.stats.optimizer
            lr = f" (lr={info.lr:g})" if info is not None else ""
            hints.append(
                f"The gradient reached the first layers at the start (ratio {ratio:.2g} at "
                f"step {step}) and collapsed during training, so the initialisation is not "
                f"the cause: the learning rate is likely too high{lr}. Lower it or warm it "
                "up, and add normalization (LayerNorm/BatchNorm) before saturating "
                "activations so that growing weights do not push them into saturation."
            )
        if signal is not None and signal.ratio >= self.t("ratio"):
            first = profile.layers[0]
            hints.append(
                "The backward signal itself reaches the early layers (ratio "
                f"{signal.ratio:.2g}), but their inputs are small: check the scaling of the "
                f"data fed to {display_name(first.name)} (normalise inputs to mean 0, std 1)."
            )
        sigmoids = activation_names(ctx.stats, (SIGMOID,))
        tanhs = activation_names(ctx.stats, (TANH,))
        if sigmoids or ctx.model.uses("Sigmoid"):
            where = f" ({format_layers(sigmoids, 3)})" if sigmoids else ""
            bound = ""
            if sigmoids:  # the user's own depth, not an example's
                n = len(sigmoids)
                bound = f" ({n} here: at most 0.25^{n} ~ {0.25**n:.1e} together)" if n > 1 else ""
            hints.append(
                f"Sigmoid layers{where} multiply the gradient by at most 0.25 each{bound}: "
                "use ReLU-family (ReLU, LeakyReLU) or GELU activations in hidden layers."
            )
        only_tanh = bool(tanhs or ctx.model.uses("Tanh")) and not sigmoids
        tanh_init_ok = gain is not None and gain >= 0.85 * TANH_GAIN
        if only_tanh and healthy_start is None:
            where = f" ({format_layers(tanhs, 3)})" if tanhs else ""
            keep = "" if tanh_init_ok else ", or keep tanh with xavier init (gain 5/3)"
            hints.append(
                f"Tanh layers{where} pass at most the gradient they get, less once they "
                f"saturate, and small weights shrink it at every layer: use ReLU-family or "
                f"GELU{keep}."
            )
        if healthy_start is not None:
            pass  # the init was fine at the start: no init advice
        elif gain is not None and only_tanh and gain < 0.85 * TANH_GAIN:
            hints.append(
                f"Weights are initialised with gain {gain:.2f}, below the 5/3 tanh needs: "
                "nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain('tanh'))."
            )
        elif gain is not None and gain < 0.85 * HE_GAIN and (has_relu(ctx) or not saturating):
            hints.append(
                f"Weights are initialised with gain {gain:.2f} (PyTorch's default is 0.58; "
                "He init gives 1.41), so every ReLU layer shrinks the signal: use kaiming "
                "(He) init, nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')."
            )
        if dead:
            hints.append(
                f"Most units of {format_layers(dead, 3)} are dead (see GW201): no "
                "gradient passes them, so the layers before them starve."
            )
        if not ctx.model.has_normalization:
            hints.append(
                "Add residual connections (out = F(x) + x) or normalization "
                "(BatchNorm/LayerNorm): they give the gradient a path with derivative ~1."
            )
        if not hints:
            hints.append(
                "Shorten the network, or add residual connections so the early layers get "
                "a direct gradient path."
            )
        return " ".join(hints)


def _worst_per_optimizer(stats: StepStats, min_layers: int, skip: set[str]) -> Profile | None:
    """The depth profile judged within the layers of each optimizer, the lowest ratio of
    them. Networks stepped by separate optimizers are trained on separate losses (a GAN's
    generator and discriminator): one's first layers and the other's last are not one
    gradient path, and their scales say nothing about each other. With one optimizer
    (or none learned yet) this is the whole model's profile."""
    owners = stats.optimizer_of
    groups = sorted(set(owners.values()))
    if len(groups) < 2:
        return gradient_profile(stats, min_layers, skip=skip)
    worst: Profile | None = None
    for group in groups:
        others = {name for name in stats.layers if owners.get(name) != group}
        profile = gradient_profile(stats, min_layers, skip=skip | others)
        if profile is None or profile.late <= 0:
            continue
        if worst is None or profile.ratio < worst.ratio:
            worst = profile
    return worst


def _ratio_text(ratio: float) -> str:
    if ratio == 0:
        return "0"
    return f"{ratio:.1e}"
