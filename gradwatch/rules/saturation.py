"""GW202 saturated-activation: most sigmoid/tanh outputs sit where the derivative is ~0,
or an attention softmax has collapsed onto few keys (see attention_saturation.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..kinds import SATURATING_KINDS, UNIT_ROW_KINDS
from ..wording import display_name
from .attention_saturation import DEFAULTS as ATTENTION_DEFAULTS
from .attention_saturation import DOCS as ATTENTION_DOCS
from .attention_saturation import AttentionSaturation
from .base import (
    POSITIVE,
    RATIO,
    SHARE,
    Condition,
    Rule,
    RuleContext,
    format_layers,
    greater_than,
    whole_at_least,
)
from .profile import gradient_profile

# Beyond |x| ~ 4.6 the sigmoid's derivative is under 1% of its maximum (tanh: |x| ~ 3).
_SATURATING_PREACTIVATION = 3.0


class SaturatedActivation(Rule):
    code = "GW202"
    slug = "saturated-activation"
    severity = "warning"
    summary = (
        "most sigmoid/tanh outputs sit where the derivative is near 0, or attention "
        "collapsed onto one key"
    )
    explanation = """\
What it measures: for each hidden nn.Sigmoid / nn.Tanh module (an output activation,
with no weight layer after it, is not judged: a confident model saturates it, and with
a matching loss such as BCE that costs no gradient), the share of its outputs where
the derivative is below 1% of its maximum (sigmoid: s(1-s) < 0.0025, i.e. |x| > ~4.6;
tanh: 1-t^2 < 0.01, i.e. |x| > ~3), and the mean derivative. It fires when more than
`fraction` of a layer's outputs are saturated for `window` monitored steps.

Why it matters: the gradient through a saturated unit is multiplied by ~0, so the
layers before it stop learning even in a shallow network. Inputs that are not
normalised (raw 0-255 pixels) saturate the first layer at once; weights that grow too
large saturate later ones.

How to fix it: normalise the inputs (mean 0, std 1; pixels / 255); initialise with
xavier (glorot) init; put normalization (BatchNorm/LayerNorm) before the activation;
lower the learning rate; in hidden layers prefer ReLU-family or GELU.

When a skip path carries the gradient past the saturated layers (a residual network:
the early layers still get at least `bypass_ratio` of the late layers' gradient RMS) and
the saturation is not at the input, the finding is only info.

Attention softmax (an nn.Softmax module, torch.softmax/F.softmax/Tensor.softmax
whose probabilities weight the values, or F.scaled_dot_product_attention, as used by
nn.MultiheadAttention and Hugging Face models): at each monitored step, on a fixed
sample of rows spread over batch entries, heads and query positions, the mean row
entropy as a share of its maximum (the log of the number of keys the row sees;
masked keys and rows with fewer than 2 keys, such as the first token of a causal
sequence, do not count), the share of rows whose largest probability is above 0.99
(every derivative of such a row is below 0.01), and the largest |logit|. An
attention module is reported, naming the module and its softmax, when its entropy is
below `attention_entropy` for `window` monitored steps and either it was already so
within `attention_start` steps of the start of training, before training could
sharpen it (with the usual scale, attention starts close to uniform), with a factor
on q.k at least `scale_ratio` times the usual 1/sqrt(head size) or a factor that was
not seen (when it is known to be the usual one, as in a pretrained model fine-tuned
from step 0, the sharpness was learned); or its largest logit is at least
`attention_logit`, far more than a sharp row needs. Heads that a trained model
sharpened on purpose (a previous-token head) are left alone.

Why it matters: a collapsed softmax passes almost no gradient to the queries and
keys, so attention stops learning and the loss plateaus (attention entropy collapse;
the attention-logit growth of large transformer runs).

How to fix it, in the order the evidence supports: the scale (q.k divided by
sqrt(head size), not multiplied: the factor is shown when it was seen), the
initialisation of the q/k projections, a learning rate that is too high or not
warmed up, and QK normalisation (LayerNorm/RMSNorm on q and k) or logit soft-
capping, which bound the logits."""
    defaults = {"fraction": 0.5, "bypass_ratio": 0.1, **ATTENTION_DEFAULTS}
    threshold_docs = {
        "fraction": "share of saturated outputs above which a layer fires",
        "bypass_ratio": "early/late gradient RMS ratio at which a skip path is taken to carry "
        "the gradient past a saturated layer (the finding is then info)",
        **ATTENTION_DOCS,
    }
    threshold_specs = {
        "fraction": SHARE,
        "bypass_ratio": RATIO,
        "attention_entropy": RATIO,
        "attention_logit": POSITIVE,
        "attention_start": whole_at_least(0),
        "scale_ratio": greater_than(1.0),
    }
    window = 3
    worse_by = 0.2

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        self._attention = AttentionSaturation()
        #: the largest saturated share of the first monitored steps judged: saturation
        #: that appears after a clean start comes from training, not from the init
        self._start: list[float] = []

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        activations = self._activations(ctx)
        attention = self._attention.check(ctx, self.thresholds)
        if activations is None and attention is None:
            return None
        return [*(activations or []), *(attention or [])]

    def state_dict(self) -> dict[str, Any]:
        return {"attention": self._attention.state_dict(), "start": list(self._start)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._attention.load_state_dict(state.get("attention") or {})
        self._start = [float(v) for v in state.get("start", [])]

    def _activations(self, ctx: RuleContext) -> list[Condition] | None:
        """Hidden sigmoid/tanh modules."""
        stats = ctx.stats
        ordered = stats.by_depth()
        # An output activation (no weight layer after it) saturates when the model is
        # confident, and with a matching loss (BCE on a sigmoid) that costs no gradient:
        # only hidden activations are judged.
        last_weight = max(
            (i for i, s in enumerate(ordered) if s.kind in UNIT_ROW_KINDS), default=-1
        )
        measured = [
            s for i, s in enumerate(ordered) if s.saturated_fraction is not None and i < last_weight
        ]
        if not measured:
            return None
        if len(self._start) < _START_STEPS and stats.trigger is None:
            self._start.append(max(s.saturated_fraction or 0.0 for s in measured))
        flagged = [s for s in measured if (s.saturated_fraction or 0.0) > self.t("fraction")]
        if not flagged:
            return []
        layers: list[str] = []
        for act in flagged:
            producer = _producer(ordered, act.name)
            if producer is not None:
                layers.append(producer)
            layers.append(act.name)
        worst = max(flagged, key=lambda s: s.saturated_fraction or 0.0)
        parts = [
            f"{display_name(s.name)} {100 * (s.saturated_fraction or 0):.0f}%" for s in flagged
        ]
        activations = [s for s in ordered if s.kind in SATURATING_KINDS]
        first_is_input = bool(activations) and flagged[0].name == activations[0].name
        # Saturation matters where it starves the layers before it. Behind a skip path
        # (out = h + sigmoid(W h)) the gradient still reaches the early layers: say so,
        # as information.
        profile = gradient_profile(stats, 3)
        bypassed = (
            not first_is_input and profile is not None and profile.ratio >= self.t("bypass_ratio")
        )
        kinds = "/".join(sorted({s.kind for s in flagged}))  # "tanh", "sigmoid/tanh"
        message = (
            f"saturated {kinds} outputs (derivative < 1% of max): "
            f"{format_layers(parts)}; mean derivative in {display_name(worst.name)} is "
            f"{(worst.mean_derivative or 0):.2g} of its maximum"
        )
        if bypassed:
            message += (
                f", but the gradient still reaches the early layers (early/late RMS ratio "
                f"{profile.ratio:.2g}): a skip path carries it"
            )
        return [
            Condition(
                layers=tuple(layers),
                message=message,
                hint=self._hint(ctx, first_is_input),
                severity="info" if bypassed else None,
                evidence={
                    "worst_layer": worst.name,
                    "saturated_fraction": worst.saturated_fraction,
                    "mean_derivative": worst.mean_derivative,
                    "layers_flagged": len(flagged),
                    "input_rms": stats.input_rms,
                    "early_late_ratio": profile.ratio if profile is not None else None,
                },
                score=worst.saturated_fraction or 0.0,
            )
        ]

    def _hint(self, ctx: RuleContext, first_is_input: bool) -> str:
        input_rms = ctx.stats.input_rms
        if first_is_input and input_rms is not None and input_rms > _SATURATING_PREACTIVATION:
            return (
                f"The model's inputs have RMS {input_rms:.3g}: they are not normalised, so "
                "the first sigmoid/tanh layer saturates at once. Scale them to mean 0, std 1 "
                "(e.g. pixels / 255, or standardise each feature)."
            )
        if len(self._start) >= _START_STEPS and max(self._start) <= self.t("fraction"):
            # Not saturated at the first monitored steps: the init was fine then, and the
            # weights grew into saturation during training.
            info = ctx.stats.optimizer
            lr = f" (lr={info.lr:g})" if info is not None else ""
            return (
                "These layers were not saturated at the start and saturated during "
                f"training: the learning rate is likely too high{lr}. Lower it or warm it "
                "up, and put BatchNorm/LayerNorm before the activation to keep "
                "pre-activations in range (or use ReLU-family/GELU activations)."
            )
        return (
            "Pre-activations are too large: initialise with xavier (glorot) init, put "
            "BatchNorm/LayerNorm before the activation, lower the learning rate, or use "
            "ReLU-family/GELU activations in hidden layers."
        )


#: Monitored steps judged at the start: unsaturated on all of them means "clean at first".
_START_STEPS = 2


def _producer(ordered: list, name: str) -> str | None:
    """The weight layer that feeds an activation: the nearest one before it."""
    previous = None
    for layer in ordered:
        if layer.name == name:
            return previous
        if layer.kind in UNIT_ROW_KINDS:
            previous = layer.name
    return None
