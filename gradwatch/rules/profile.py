"""The depth profile that the vanishing and exploding rules compare: one number per
weight layer, in forward order, plus the facts their hints are built from; and the cuts
in it, where the gradient stops at once instead of fading (see :func:`find_cuts`)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..kinds import MATRIX_KINDS, RECURRENT, RELU, SATURATING_KINDS
from ..stats import LayerStats, OptimizerInfo, StepStats
from ..units import UnitGroup, recent_blockers
from .base import RuleContext, edge_size, gradients_finite, matrix_layers, median

#: float32 has 24 significant bits: an update below 2**-24 of a weight leaves it unchanged.
FLOAT32_RESOLUTION = 2.0**-24
#: PyTorch's default Linear/Conv init has gain 1/sqrt(3) ~ 0.58; He init for ReLU sqrt(2).
HE_GAIN = math.sqrt(2.0)
#: ... and what tanh needs to keep the signal's scale (nn.init.calculate_gain("tanh")).
TANH_GAIN = 5.0 / 3.0


@dataclass
class Profile:
    layers: list[LayerStats]
    values: list[float]  # what is compared (gradient RMS, or Adam's relative step size)
    early: float
    late: float
    k: int

    @property
    def ratio(self) -> float:
        if self.late <= 0:
            return math.inf if self.early > 0 else 1.0
        return self.early / self.late

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layers]


def effective_speed(rms: float, optimizer: OptimizerInfo | None) -> float:
    """How fast a layer with this gradient RMS learns, relative to its peers.

    Plain SGD moves weights in proportion to the gradient. Adam-like optimizers divide
    by the gradient's own running scale, so every layer steps at about ``lr`` until the
    gradient falls towards ``eps``: then the step shrinks by ``rms / (rms + eps)``.
    """
    return effective_speeds((rms,), optimizer)[0]


def effective_speeds(rms: Sequence[float], optimizer: OptimizerInfo | None) -> list[float]:
    """:func:`effective_speed` of each of ``rms`` (the optimizer looked at once)."""
    if optimizer is not None and optimizer.adaptive and optimizer.eps:
        eps = optimizer.eps
        return [r / (r + eps) for r in rms]
    return list(rms)


def build_profile(
    layers: Sequence[LayerStats], values: Sequence[float], min_layers: int
) -> Profile | None:
    if len(layers) < min_layers or not all(map(math.isfinite, values)):
        return None
    k = edge_size(len(layers))
    return Profile(list(layers), list(values), median(values[:k]), median(values[-k:]), k)


def gradient_profile(
    stats: StepStats, min_layers: int, skip: Collection[str] = ()
) -> Profile | None:
    """Gradient RMS of each weight layer, as the optimizer will feel it (layers named in
    ``skip`` left out)."""
    layers = [s for s in matrix_layers(stats) if s.grad_rms is not None and s.name not in skip]
    speeds = effective_speeds([s.grad_rms or 0.0 for s in layers], stats.optimizer)
    return build_profile(layers, speeds, min_layers)


def signal_profile(stats: StepStats, min_layers: int) -> Profile | None:
    """RMS of the gradient with respect to each weight layer's output: the backward
    signal itself, independent of the scale of each layer's input. Recurrent layers are
    left out: the loss often reads one time step (or the final state) of their output, so
    the signal there is spread thin over the sequence and says little about their inside."""
    layers = [
        s for s in matrix_layers(stats) if s.output_grad_rms is not None and s.kind != RECURRENT
    ]
    values = [s.output_grad_rms or 0.0 for s in layers]
    return build_profile(layers, values, min_layers)


def init_gain(layers: Sequence[LayerStats]) -> float | None:
    """Median of param_rms * sqrt(fan_in) over Linear/Conv layers: 1.41 for He init,
    ~1 for Xavier on square layers, 0.58 for PyTorch's default. (A step's ``param_rms``
    is the latest measured: it is carried over between detail steps.)"""
    gains = []
    for layer in layers:
        rms = layer.param_rms
        if rms is not None and layer.fan_in:
            gains.append(rms * math.sqrt(layer.fan_in))
    return median(gains) if gains else None


def activation_names(stats: StepStats, kinds: Sequence[str]) -> list[str]:
    return [s.name for s in stats.by_depth() if s.kind in kinds]


def has_relu(ctx: RuleContext) -> bool:
    return bool(activation_names(ctx.stats, (RELU,))) or ctx.model.uses("ReLU", "ReLU6")


# -- cuts: where the gradient stops at once --------------------------------------------

#: A run of layers with exactly-zero gradients ends in a cut, not in an underflow, when the
#: layer right after it still gets at least this share of what the late layers get (the
#: level below which GW101 calls a layer starved, by default). Underflow is the end of a
#: geometric decay: the layers leading into the zeros are starved themselves (a 30-layer
#: sigmoid stack has ~1e-21 of the late gradient next to its zeros). A cut drops from a
#: normal gradient to none within one operation, which only a zero derivative (rounding,
#: a step function) or a missing graph edge (detach, argmax, an integer cast) can do.
CUT_LEVEL = 1e-2


@dataclass(frozen=True)
class Cut:
    """A place where the gradient stops: the ``blocked`` modules (in forward order) get
    none, while ``after``, the next module in forward order, gets a normal one."""

    blocked: tuple[str, ...]
    #: the last module before the cut, and the first one after it with a gradient
    before: str
    after: str
    #: True when the gradient arrives as zeros (a derivative of 0), False when it never
    #: arrives (.grad is None: no autograd path at all)
    zero: bool
    #: how the cut was seen: "no graph", "backward signal" or "weight gradients"
    seen_in: str
    #: the gradient right after the cut relative to the late layers' (None: not measured)
    level: float | None
    #: "forward" (measured order) or "registration" (no forward statistics)
    order: str


def gets_gradient(layer: LayerStats) -> bool:
    """True when some trainable parameter of the module got a non-zero gradient."""
    return layer.grad_norm is not None and layer.grad_norm != 0.0  # NaN counts as one


def lacks_gradient(layer: LayerStats) -> bool:
    """True for a module with trainable parameters whose gradient is None or exactly 0."""
    if layer.grad_norm is None:
        return bool(layer.missing_grad)
    return layer.grad_norm == 0.0


def forward_order_known(stats: StepStats) -> bool:
    """True when the forward order was measured (forward hooks ran on a detail step)."""
    return any(s.depth is not None for s in stats)


def find_cuts(stats: StepStats, recent: Sequence[StepStats]) -> list[Cut]:
    """The cuts in this step's gradient flow, in forward order.

    Modules with trainable parameters are walked in forward order (registration order
    when the model ran without forward hooks, e.g. compiled); each run of modules without
    gradient that is followed by one with a gradient is a candidate. Runs whose
    ``.grad`` is None have no autograd path: always a cut. Runs with exactly-zero
    gradients may also be an underflow (GW101's) or a layer of dead or fully saturated
    units (GW201's, GW202's): they are a cut when the backward signal (on the most
    recent detail step of ``recent``) shows no gradient at all at the run's output, or
    shows a normal one right after the run (``CUT_LEVEL``); without a signal measurement,
    when the weight gradient right after the run is normal.
    """
    cached = stats.__dict__.get("_cuts")
    if cached is None:
        cached = _find_cuts(stats, recent)
        stats.__dict__["_cuts"] = cached
    return list(cached)


def _find_cuts(stats: StepStats, recent: Sequence[StepStats]) -> list[Cut]:
    if not gradients_finite(stats):
        return []  # GW103's business
    # The usual step: every module with parameters got a non-zero gradient, so there is
    # no run to judge (one pass, before the modules are put in forward order).
    if not any(map(lacks_gradient, stats.layers.values())):
        return []
    known = forward_order_known(stats)
    chain = [
        s
        for s in stats.by_depth()
        if (gets_gradient(s) or lacks_gradient(s)) and (not known or s.depth is not None)
    ]
    if not any(lacks_gradient(s) for s in chain):
        return []
    weights = [s for s in chain if s.kind in MATRIX_KINDS and gets_gradient(s)]
    late = _late(effective_speeds([s.grad_rms or 0.0 for s in weights], stats.optimizer))
    detail = next((s for s in reversed(recent) if s.detail and s.activations_observed), None)
    late_signal = 0.0
    if detail is not None:
        late_signal = _late([s.output_grad_rms for s in matrix_layers(detail) if s.output_grad_rms])
    blockers = recent_blockers(list(recent)) if recent else []
    context = _CutContext(stats, known, late, detail, late_signal, blockers)
    cuts: list[Cut] = []
    i = 0
    while i < len(chain):
        if not lacks_gradient(chain[i]):
            i += 1
            continue
        j = i
        while j < len(chain) and lacks_gradient(chain[j]):
            j += 1
        if j == len(chain):
            break  # nothing after the run gets a gradient: no boundary to name
        cut = _judge(chain[i:j], chain[j:], context)
        if cut is not None:
            cuts.append(cut)
        i = j
    return cuts


@dataclass
class _CutContext:
    stats: StepStats
    known: bool
    late: float
    detail: StepStats | None
    late_signal: float
    blockers: list[UnitGroup]


def _late(values: Sequence[float]) -> float:
    return median(values[-edge_size(len(values)) :]) if values else 0.0


def _judge(run: list[LayerStats], rest: list[LayerStats], ctx: _CutContext) -> Cut | None:
    before, after = run[-1], rest[0]
    zero = any(s.grad_norm == 0.0 for s in run)
    order = "forward" if ctx.known else "registration"
    weight_level = None
    first_weight = next((s for s in rest if s.kind in MATRIX_KINDS and gets_gradient(s)), None)
    if first_weight is not None and ctx.late > 0:
        speed = effective_speed(first_weight.grad_rms or 0.0, ctx.stats.optimizer)
        weight_level = speed / ctx.late
    no_graph, signal_level = _signal(before, after, ctx)
    blocked = tuple(s.name for s in run)
    edge = _last_before(before, after, ctx)
    if not zero or no_graph:
        level = signal_level if signal_level is not None else weight_level
        return Cut(blocked, edge, after.name, zero, "no graph", level, order)
    if _explained(before, after, ctx):
        return None
    # The backward signal is the direct measurement; weight gradients also carry the
    # scale of each layer's input, so they decide only where the signal was not measured.
    if signal_level is not None:
        if signal_level >= CUT_LEVEL:
            return Cut(blocked, edge, after.name, True, "backward signal", signal_level, order)
        return None
    if weight_level is not None and weight_level >= CUT_LEVEL:
        return Cut(blocked, edge, after.name, True, "weight gradients", weight_level, order)
    return None


def _last_before(before: LayerStats, after: LayerStats, ctx: _CutContext) -> str:
    """The last module before the cut: ``before`` or a module without parameters (an
    activation) that ran after it and whose output got no gradient either."""
    detail = ctx.detail
    if detail is None or before.depth is None or after.depth is None:
        return before.name
    last = before.name
    for s in detail.by_depth():
        if s.depth is None or s.depth >= after.depth:
            break
        if s.depth > before.depth and s.calls > 0 and not s.output_grad_rms:
            last = s.name
    return last


def _signal(before: LayerStats, after: LayerStats, ctx: _CutContext) -> tuple[bool, float | None]:
    """From the last detail step: (no gradient came back to the output of ``before`` at
    all, the backward signal at ``after`` relative to the late layers')."""
    if ctx.detail is None:
        return False, None
    then_before = ctx.detail.layers.get(before.name)
    then_after = ctx.detail.layers.get(after.name)
    if then_before is None or then_before.calls == 0 or then_before.output_rms is None:
        return False, None  # it did not run (with a non-empty output) at that step
    if then_before.output_grad_rms is None:
        return True, None  # it ran, yet autograd never reached its output
    if then_before.output_grad_rms != 0.0 or then_after is None:
        return False, None
    if then_after.output_grad_rms is None or ctx.late_signal <= 0:
        return False, None
    return False, then_after.output_grad_rms / ctx.late_signal


def _explained(before: LayerStats, after: LayerStats, ctx: _CutContext) -> bool:
    """True when a layer of units that pass no gradient at all sits at the cut: every
    unit dead (GW201's finding) or every output saturated (GW202's)."""
    ordered = ctx.known and before.depth is not None and after.depth is not None
    for group in ctx.blockers:
        if group.producer == before.name:
            return True
        if ordered and before.depth < group.depth < after.depth:  # type: ignore[operator]
            return True
    if not ordered:
        return False
    return any(
        s.kind in SATURATING_KINDS
        and s.depth is not None
        and before.depth < s.depth < after.depth
        and (s.saturated_fraction or 0.0) >= 1.0
        for s in ctx.stats
    )
