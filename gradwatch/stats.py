"""Host-side records of one monitored step: :class:`StepStats` holding :class:`LayerStats`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .loss_input import LossInput


@dataclass(frozen=True, slots=True)
class UnitMask:
    """A set of unit (neuron / channel) indices of one layer, stored as a bit mask.

    Bit ``i`` is set when unit ``i`` is in the set. Masks from several steps combine
    with ``|`` (units seen in any step) and ``&`` (units seen in every step).

    >>> a, b = UnitMask(0b0101, 4), UnitMask(0b0011, 4)
    >>> (a | b).count(), (a & b).indices()
    (3, [0])
    >>> a.complement().indices()
    [1, 3]
    """

    bits: int
    size: int

    def count(self) -> int:
        """How many units are in the set."""
        return self.bits.bit_count()

    def fraction(self) -> float:
        """Share of the layer's units that are in the set."""
        return self.count() / self.size if self.size else 0.0

    def indices(self, limit: int | None = None) -> list[int]:
        """The unit indices in the set, ascending (at most ``limit`` of them)."""
        out: list[int] = []
        bits, i = self.bits, 0
        while bits and (limit is None or len(out) < limit):
            low = bits & -bits
            i = low.bit_length() - 1
            out.append(i)
            bits ^= low
        return out

    def complement(self) -> UnitMask:
        """The units not in the set."""
        return UnitMask(~self.bits & ((1 << self.size) - 1), self.size)

    def __or__(self, other: UnitMask) -> UnitMask:
        return UnitMask(self.bits | other.bits, max(self.size, other.size))

    def __and__(self, other: UnitMask) -> UnitMask:
        return UnitMask(self.bits & other.bits, max(self.size, other.size))

    def to_hex(self) -> str:
        """Compact text form for JSON records (see :meth:`from_hex`)."""
        return f"{self.size}:{self.bits:x}"

    @classmethod
    def from_hex(cls, text: str) -> UnitMask:
        size, bits = text.split(":", 1)
        return cls(int(bits, 16), int(size))


_MASK_FIELDS = ("zero_grad_units", "active_units", "positive_units")


@dataclass(slots=True)
class LayerStats:
    """Statistics of one module at one monitored step.

    Gradient fields describe the module's *own* trainable parameters (``None`` for
    parameter-free modules); signal fields describe the tensors flowing through it;
    activation fields exist for ReLU-family and sigmoid/tanh modules.
    Fields that were not measured at this step are ``None``.
    """

    name: str
    kind: str
    depth: float | None = None

    # Gradients of the module's own trainable parameters.
    grad_norm: float | None = None
    grad_rms: float | None = None
    grad_max: float | None = None
    grad_zero_fraction: float | None = None
    grad_nonfinite: int | None = None
    param_norm: float | None = None
    param_rms: float | None = None
    numel: int = 0
    fan_in: int | None = None
    missing_grad: tuple[str, ...] = ()

    # Linear/Conv weights: output units whose gradient row is exactly zero.
    units: int | None = None
    zero_grad_units: UnitMask | None = None

    # Recurrent layers: gradient RMS of the hidden-to-hidden (weight_hh*) and
    # input-to-hidden (weight_ih*) matrices, all layers and directions together.
    hh_grad_rms: float | None = None
    ih_grad_rms: float | None = None
    #: norm of the weight_hh gradient per input unit (its column): |dW_hh| / sqrt(columns)
    hh_grad_per_input: float | None = None

    # Signals: forward output and the gradient with respect to that output.
    output_rms: float | None = None
    output_grad_norm: float | None = None
    output_grad_rms: float | None = None
    output_nonfinite: bool | None = None

    # Activations: ReLU-family units that were active, sigmoid/tanh saturation.
    active_units: UnitMask | None = None
    #: Linear/Conv: units whose output (the pre-activation) was positive for some sample
    positive_units: UnitMask | None = None
    saturated_fraction: float | None = None
    mean_derivative: float | None = None
    calls: int = 0

    # The update: how far the last optimizer step moved the module's own parameters.
    #: |Δw| / |w| over one optimizer step, from a sample of the weights taken one step
    #: before this monitored step (see gradwatch.update); None when not measured
    update_ratio: float | None = None
    #: parameters the optimizer does not update, each as "name (reason)"
    not_updated: tuple[str, ...] = ()

    @property
    def has_gradient(self) -> bool:
        """True when the module owns trainable parameters that received a gradient."""
        return self.grad_norm is not None

    @property
    def grad_finite(self) -> bool:
        return self.grad_norm is None or math.isfinite(self.grad_norm)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in _MASK_FIELDS:
            mask = getattr(self, key)
            data[key] = mask.to_hex() if mask is not None else None
        data["missing_grad"] = list(self.missing_grad)
        data["not_updated"] = list(self.not_updated)
        return {k: _json_number(v) for k, v in data.items() if v is not None and v != []}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerStats:
        data = dict(data)
        for key in _MASK_FIELDS:
            if data.get(key) is not None:
                data[key] = UnitMask.from_hex(data[key])
        data["missing_grad"] = tuple(data.get("missing_grad", ()))
        data["not_updated"] = tuple(data.get("not_updated", ()))
        known = cls.__dataclass_fields__
        return cls(**{k: _from_json_number(v) for k, v in data.items() if k in known})


#: A row of attention probabilities is saturated when its largest probability is above
#: this: every derivative of the row's probabilities with respect to its logits is then
#: below 0.01 (p_i (1 - p_i) < 0.0099; 4% of the 0.25 of a row split evenly between two
#: keys), so almost no gradient reaches the queries and keys.
SATURATED_PROBABILITY = 0.99
#: A key whose logit is at or below this is masked (-inf, finfo.min, and the -1e4 / -1e9
#: of additive masks); unmasked attention logits are orders of magnitude smaller.
MASK_LEVEL = -5e3
#: Rows with fewer unmasked keys are not judged: the first token of a causal sequence
#: sees only itself, and a one-key row is one-hot by construction.
MIN_KEYS = 2


@dataclass(slots=True)
class AttentionStats:
    """Attention probabilities of one module at one monitored step.

    ``name`` is the module that computed attention (the innermost module running the
    softmax or ``scaled_dot_product_attention`` call); ``softmax`` names the
    ``nn.Softmax`` module inside it when that computed the probabilities. Row statistics
    come from a fixed sample of rows spread over batch entries, heads and query positions;
    rows with fewer than ``MIN_KEYS`` unmasked keys are not judged.
    """

    name: str
    softmax: str = ""
    #: how the probabilities were computed: "softmax", "nn.Softmax",
    #: "scaled_dot_product_attention"
    via: str = ""
    calls: int = 0
    keys: int = 0  # keys per row (the largest call's)
    rows: int = 0  # rows of all calls (batch x heads x queries)
    sampled_rows: int = 0
    judged_rows: int = 0  # sampled rows with at least MIN_KEYS unmasked keys
    #: share of judged rows whose largest probability is above SATURATED_PROBABILITY
    saturated_fraction: float | None = None
    #: mean row entropy over its maximum, the log of the row's number of unmasked keys
    #: (1: uniform attention; 0: one-hot)
    entropy: float | None = None
    #: largest |logit| among unmasked keys in the sampled rows
    max_logit: float | None = None
    #: share of sampled rows whose every key is masked
    masked_row_fraction: float | None = None
    #: detail steps (full counts): rows whose probabilities are NaN/Inf, rows whose logits
    #: already were, rows whose every key is masked
    nonfinite_rows: int | None = None
    nonfinite_logit_rows: int | None = None
    fully_masked_rows: int | None = None
    #: the factor applied to q.k when it was seen (SDPA's scale, or a scalar product of
    #: the scores), and the size of the q.k contraction (the head size)
    scale: float | None = None
    head_dim: int | None = None
    #: place in forward order among the watched modules (detail steps)
    depth: float | None = None

    @property
    def label(self) -> str:
        """The module, with its softmax module when there is one."""
        name = self.name or "<root>"
        return f"{name} ({self.softmax})" if self.softmax else name

    @property
    def scale_ratio(self) -> float | None:
        """The scale over the usual 1/sqrt(head size) (1.0: the usual scale)."""
        if self.scale is None or not self.head_dim:
            return None
        return self.scale * math.sqrt(self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionStats:
        known = cls.__dataclass_fields__
        return cls(**{k: _from_json_number(v) for k, v in data.items() if k in known})


@dataclass
class OptimizerInfo:
    """What the rules need to know about the optimizer (see :func:`gradwatch.optim.describe`)."""

    name: str
    lr: float
    adaptive: bool
    eps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepStats:
    """Everything gradwatch measured at one monitored step.

    ``layers`` is keyed by the qualified module names that ``named_modules()`` gives
    (a DDP or ``torch.compile`` wrapper's prefix removed) and ordered by forward depth.
    """

    step: int
    layers: dict[str, LayerStats]
    global_grad_norm: float
    global_param_norm: float | None = None
    missing: tuple[str, ...] = ()
    optimizer: OptimizerInfo | None = None
    activations_observed: bool = True
    input_rms: float | None = None
    detail: bool = True
    #: the loss passed to ``watcher.step(loss=...)`` at this step
    loss: float | None = None
    #: a GradScaler's scale when the gradients were computed (statistics are unscaled)
    loss_scale: float | None = None
    #: why this step was measured off schedule: the every-step sentinel saw
    #: ``"nonfinite"`` / ``"surge"`` gradients or a ``"loss-nonfinite"`` / ``"loss-surge"``
    trigger: str | None = None
    #: with a ``"surge"`` trigger: the sampled gradient norm over its recent median
    surge: float | None = None
    #: attention probabilities per attention module (module name -> statistics)
    attention: dict[str, AttentionStats] = field(default_factory=dict)
    #: what reached the loss functions (cross_entropy, nll_loss, BCE) after the forward pass
    loss_inputs: list[LossInput] = field(default_factory=list)
    #: members of a ModuleList/ModuleDict that never got a gradient, with the number of
    #: steps (every step, not only monitored ones) they went without one
    steps_without_gradient: dict[str, int] = field(default_factory=dict)
    #: layers whose .grad was checked across an optimizer step since the last monitored
    #: step, and those among them whose gradient was carried over (never cleared)
    carry_checked: int = 0
    carried: tuple[str, ...] = ()
    #: layer name -> index of the optimizer that updates it, learned from the loop's first
    #: optimizer steps (empty until learned); several indices: separately trained networks
    optimizer_of: dict[str, int] = field(default_factory=dict)
    #: median of the losses passed to ``watcher.step(loss=...)`` at the last (up to 16)
    #: steps, every step counted: a steadier level than this step's loss
    recent_loss: float | None = None

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self.layers.values())

    def by_depth(self, *, with_gradient: bool = False) -> list[LayerStats]:
        """Layers in forward order (modules that never ran last, in registration order)."""
        ordered = self.__dict__.get("_ordered")
        if ordered is None or len(ordered) != len(self.layers):
            ordered = sorted(
                self.layers.values(),
                key=lambda s: (s.depth is None, s.depth if s.depth is not None else 0.0),
            )
            self.__dict__["_ordered"] = ordered
        if with_gradient:
            return [s for s in ordered if s.has_gradient]
        return list(ordered)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "global_grad_norm": _json_number(self.global_grad_norm),
            "global_param_norm": _json_number(self.global_param_norm),
            "missing": list(self.missing),
            "optimizer": self.optimizer.to_dict() if self.optimizer else None,
            "activations_observed": self.activations_observed,
            "input_rms": _json_number(self.input_rms),
            "detail": self.detail,
            "loss": _json_number(self.loss),
            "loss_scale": _json_number(self.loss_scale),
            "trigger": self.trigger,
            "surge": _json_number(self.surge),
            "recent_loss": _json_number(self.recent_loss),
            "layers": {name: s.to_dict() for name, s in self.layers.items()},
            **(
                {"attention": {n: a.to_dict() for n, a in self.attention.items()}}
                if self.attention
                else {}
            ),
            **(
                {"loss_inputs": [x.to_dict() for x in self.loss_inputs]}
                if self.loss_inputs
                else {}
            ),
            **({"steps_without_gradient": self.steps_without_gradient}
               if self.steps_without_gradient else {}),
            **({"carry_checked": self.carry_checked} if self.carry_checked else {}),
            **({"carried": list(self.carried)} if self.carried else {}),
            # only when it matters to a replay: several optimizers share the layers
            **(
                {"optimizer_of": dict(self.optimizer_of)}
                if len(set(self.optimizer_of.values())) > 1
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepStats:
        opt = data.get("optimizer")
        return cls(
            step=int(data["step"]),
            layers={n: LayerStats.from_dict(v) for n, v in data.get("layers", {}).items()},
            global_grad_norm=_from_json_number(data.get("global_grad_norm")),
            global_param_norm=_from_json_number(data.get("global_param_norm")),
            missing=tuple(data.get("missing", ())),
            optimizer=OptimizerInfo(**opt) if opt else None,
            activations_observed=bool(data.get("activations_observed", True)),
            input_rms=_from_json_number(data.get("input_rms")),
            detail=bool(data.get("detail", True)),
            loss=_from_json_number(data.get("loss")),
            loss_scale=_from_json_number(data.get("loss_scale")),
            trigger=data.get("trigger"),
            surge=_from_json_number(data.get("surge")),
            recent_loss=_from_json_number(data.get("recent_loss")),
            attention={
                n: AttentionStats.from_dict(v) for n, v in (data.get("attention") or {}).items()
            },
            loss_inputs=[LossInput.from_dict(x) for x in data.get("loss_inputs") or []],
            steps_without_gradient=dict(data.get("steps_without_gradient") or {}),
            carry_checked=int(data.get("carry_checked", 0)),
            carried=tuple(data.get("carried", ())),
            optimizer_of={n: int(i) for n, i in (data.get("optimizer_of") or {}).items()},
        )


def _json_number(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so records stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json_number(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value
