"""GW105 not-updated: parameters that get a gradient but whose weights never move."""

from __future__ import annotations

from .base import Condition, Rule, RuleContext, format_layers
from .updates import not_updated_by_optimizer, stuck_layers


class NotUpdated(Rule):
    code = "GW105"
    slug = "not-updated"
    severity = "warning"
    summary = "parameters get gradients but the optimizer never updates them"
    explanation = """\
What it measures: parameters that receive a gradient at every step while their weights
do not change. Two ways:
- from the optimizer, when gradwatch knows it (watch(model, optimizer=opt) or
  step(optimizer=opt)): a watched parameter that is in none of the optimizer's
  param_groups, or in a group whose lr is 0 while other groups' lr is not. Announced
  after `window` monitored steps;
- from the weights: the update of a layer measured across one optimizer step is
  exactly 0 although it had a gradient at that step, and the step the optimizer gave
  the other layers per unit of gradient would have moved it far (1,000x) above
  float32's resolution, for 3 monitored steps (any optimizer, also one gradwatch is not
  told about).

Why it matters: the layer is not trained although the gradient computation for it is
paid for. Typical causes: a head replaced or added after the optimizer was built (the
optimizer still holds the old module's parameters); an optimizer built from
model.backbone.parameters() only; a param group with lr=0 left over from a freezing
recipe; bf16 weights whose updates are below their precision. When zero_grad() clears
only the optimizer's parameters, the gradient of the left-out ones piles up step after
step: that growing gradient is not an explosion (GW102 leaves such layers out).

How to fix it: build the optimizer after the model is complete, or add the new
parameters: optimizer.add_param_group({"params": model.head.parameters()}); give the
group a learning rate > 0. To freeze a part on purpose, set requires_grad_(False) on it
so that no gradient is computed at all (gradwatch then leaves it alone).

When it stays silent: every parameter with a gradient is in a group with lr > 0; every
group at lr 0 (a schedule's first or last step); frozen parameters (requires_grad=False);
parameters without a gradient (GW104's business)."""
    window = 2
    fast = False

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        out: list[Condition] = []
        left_out = {
            s.name: entries for s in stats if (entries := not_updated_by_optimizer(s))
        }
        if left_out:
            names = list(left_out)
            described = [
                f"{name}.{entry}" if name else entry
                for name, entries in left_out.items()
                for entry in entries
            ]
            out.append(
                Condition(
                    key="optimizer",
                    layers=tuple(names),
                    message=(
                        f"{len(described)} parameter(s) get gradients but the optimizer never "
                        f"updates them: {_listed(described)}"
                    ),
                    hint=_hint(described),
                    evidence={
                        "parameters": described,
                        "optimizer": stats.optimizer.name if stats.optimizer else None,
                    },
                    score=float(len(described)),
                )
            )
        stuck = stuck_layers(ctx)
        still = [s for s in stats.by_depth() if s.name in stuck and s.name not in left_out]
        if still:
            names = [s.name for s in still]
            out.append(
                Condition(
                    key="measured",
                    layers=tuple(names),
                    message=(
                        f"the weights of {format_layers(names)} did not change across an "
                        "optimizer step although they have a gradient (gradient norm "
                        f"{still[0].grad_norm:.3g}) and other layers moved"
                    ),
                    hint=(
                        "Check that the optimizer holds these parameters (build it after "
                        "replacing or adding modules, or optimizer.add_param_group(...)) "
                        "and that their learning rate is > 0; in bf16, updates below the "
                        "weights' precision are lost (keep float32 master weights). Pass "
                        "optimizer= to gradwatch to have the reason named."
                    ),
                    evidence={"layers": names, "grad_norm": still[0].grad_norm},
                    score=float(len(names)),
                    window=3,
                )
            )
        if not out and not any(s.update_ratio is not None for s in stats) and not any(
            s.not_updated for s in stats
        ):
            return None if stats.optimizer is None else []
        return out


def _listed(entries: list[str], limit: int = 6) -> str:
    shown = entries[:limit]
    more = len(entries) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _hint(entries: list[str]) -> str:
    parts = []
    if any("not in the optimizer" in e for e in entries):
        parts.append(
            "Build the optimizer after the model is complete (a head replaced or added "
            "afterwards is not in it), or add the parameters: "
            "optimizer.add_param_group({'params': module.parameters()})"
        )
    if any("lr is 0" in e for e in entries):
        parts.append("give that param group a learning rate > 0")
    parts.append(
        "to freeze parameters on purpose, set requires_grad_(False) on them so that no "
        "gradient is computed"
    )
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]
