"""GW301 loss-input-mismatch: a loss gets a different kind of tensor than it is defined on
(probabilities where it applies its own softmax/sigmoid, scores where it expects
log-probabilities)."""

from __future__ import annotations

from ..loss_input import LossInput
from ..stats import StepStats
from .base import SHARE, Condition, Rule, RuleContext, whole_at_least
from .loss_words import fix_place, loss_evidence, percent, source

#: Operations whose output lies in [0, 1] (see ``loss_contract.made_by``).
_SQUASHING = frozenset({"sigmoid", "softmax", "hardsigmoid", "clamp"})


class LossInputMismatch(Rule):
    code = "GW301"
    slug = "loss-input-mismatch"
    severity = "error"
    summary = (
        "a loss gets probabilities where it expects logits (double softmax, sigmoid into a "
        "with-logits loss) or scores where it expects log-probabilities"
    )
    explanation = """\
What it measures: at monitored steps, the tensor that reaches F.cross_entropy,
F.nll_loss and F.binary_cross_entropy_with_logits (and nn.CrossEntropyLoss,
nn.NLLLoss, nn.BCEWithLogitsLoss, which call them) after the model's forward pass, on
a sample of up to 2,048 rows. It fires when, for `window` monitored steps:

- cross_entropy gets rows that are all >= 0 and sum to 1 (at least `share` of them):
  probabilities, from a softmax at the end of the model (nn.Softmax or F.softmax);
- binary_cross_entropy_with_logits gets values that all lie in [0, 1] (at least `share`
  of them, and at least `min_values` values, most of them not exactly 0) and were made
  by an operation into [0, 1] (a sigmoid, softmax, hardsigmoid or clamp): a sigmoid's
  outputs, not small raw logits of a fresh output layer;
- nll_loss gets rows whose exp sums to more than 1 (fewer than 1 - `share` of them are
  log-probabilities): raw scores, or probabilities without the log.

The finding names the module whose output reached the loss and the operation that made
it (from the tensor's autograd node).

Why it matters: cross_entropy applies log-softmax itself; on probabilities it computes
softmax(softmax(z)), whose logits are squeezed into [0, 1]: the predicted distribution
can never be confident and the gradient to the model is a fraction of the right one, so
learning stalls above its floor. A with-logits loss applies the sigmoid itself: on
sigmoid outputs in [0, 1] it can never predict below 0.5. nll_loss only picks the
target's entry and negates it: on raw scores the loss is unbounded below (it falls
without limit while accuracy does not improve).

How to fix it: return raw logits from the model and let the loss normalise them
(remove the final nn.Softmax / F.softmax; take softmax or argmax only for predictions);
remove the sigmoid before BCEWithLogitsLoss (or keep it and use BCELoss, which is
numerically worse); put log_softmax before nll_loss, or use cross_entropy on the logits.

When it stays silent: logits into cross_entropy however the loss is called (label
smoothing, class weights, ignore_index, soft or probabilistic targets, logits divided by
a temperature as in distillation or InfoNCE with tau = 0.07); log_softmax before
cross_entropy (harmless: log_softmax of log-probabilities changes nothing);
log_softmax (or the log of a mixture of probabilities, or log-probabilities with some
classes masked to -inf) into nll_loss; logits of a
multilabel model into BCEWithLogitsLoss; logits that are all exactly 0 (a
zero-initialised output layer, before its first update); a loss on a tensor that needs
no gradient (a teacher's output, a metric under no_grad). Not seen: losses computed inside a
torch.compile'd model, functional losses inside the model's own forward (a loss module
such as nn.CrossEntropyLoss there is seen), and watchers with activations=False."""
    defaults = {"share": 0.99, "min_values": 32}
    threshold_docs = {
        "share": "share of the rows (values) checked that must have the wrong form",
        "min_values": "values a with-logits loss must get before all of them lying in "
        "[0, 1] means anything",
    }
    threshold_specs = {"share": SHARE, "min_values": whole_at_least(1)}
    window = 2
    clear_after = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        inputs = ctx.stats.loss_inputs
        if not inputs:
            return None
        share = self.t("share")
        found: dict[str, Condition] = {}
        for seen in inputs:
            condition = self._judge(seen, share, ctx.stats)
            if condition is not None and condition.key not in found:
                found[condition.key] = condition
        return list(found.values())

    def _judge(self, seen: LossInput, share: float, stats: StepStats) -> Condition | None:
        key = f"{seen.function}:{seen.producer or seen.last_layer}"
        if seen.function == "cross_entropy" and seen.probability_rows >= share:
            return Condition(
                layers=seen.layers,
                message=(
                    f"cross_entropy gets probabilities: {percent(seen.probability_rows)} of its "
                    f"{seen.rows} rows from {source(seen)} are >= 0 and sum to 1; "
                    "cross_entropy applies log-softmax again, so its gradient to the model "
                    "is squashed"
                ),
                hint=(
                    f"Remove the softmax{fix_place(seen)}: return raw logits and let "
                    "cross_entropy normalise them; apply softmax only when you need "
                    "probabilities for predictions (argmax needs none)."
                ),
                evidence=loss_evidence(seen, stats, probability_rows=seen.probability_rows),
                score=seen.probability_rows,
                key=key,
            )
        if (
            seen.function == "binary_cross_entropy_with_logits"
            and seen.unit_interval >= share
            and seen.zeros < 0.5  # all 0: a zero-initialised output layer, not a sigmoid
            and seen.rows * seen.classes >= self.t("min_values")
            # Small raw logits (a fresh output layer) can all lie in [0, 1] too: only an
            # operation that squashes into [0, 1] is a sigmoid applied twice.
            and seen.via in _SQUASHING
        ):
            return Condition(
                layers=seen.layers,
                message=(
                    f"binary_cross_entropy_with_logits gets values in [0, 1]: "
                    f"{percent(seen.unit_interval)} of the outputs of {source(seen)}; "
                    "the loss applies a sigmoid again, so no prediction can go below 0.5"
                ),
                hint=(
                    f"Remove the sigmoid{fix_place(seen)} and keep BCEWithLogitsLoss on the "
                    "raw logits (or keep the sigmoid and use BCELoss, which is less stable)."
                ),
                evidence=loss_evidence(seen, stats, unit_interval=seen.unit_interval),
                score=seen.unit_interval,
                key=key,
            )
        if seen.function == "nll_loss" and seen.log_probability_rows <= 1.0 - share:
            probabilities = seen.probability_rows >= share
            what = "probabilities (rows >= 0 summing to 1)" if probabilities else "raw scores"
            return Condition(
                layers=seen.layers,
                message=(
                    f"nll_loss gets {what}, not log-probabilities: "
                    f"{percent(1.0 - seen.log_probability_rows)} of its {seen.rows} rows from "
                    f"{source(seen)} have exp summing to more than 1; nll_loss only "
                    "negates the target's entry, so the loss is not a likelihood"
                ),
                hint=(
                    "Use log_softmax instead of softmax before nll_loss."
                    if probabilities
                    else "Apply log_softmax to the scores before nll_loss, or pass the raw "
                    "logits to cross_entropy instead (it is log_softmax + nll_loss in one)."
                ),
                evidence=loss_evidence(
                    seen, stats, log_probability_rows=seen.log_probability_rows
                ),
                score=1.0 - seen.log_probability_rows,
                key=key,
            )
        return None
