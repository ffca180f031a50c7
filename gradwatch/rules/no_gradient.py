"""GW104 no-gradient: trainable parameters that never get a gradient: cut off by an
operation autograd cannot pass (a blocked gradient), never selected by a router, or
never used."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..stats import LayerStats, StepStats
from ..wording import display_name
from .base import RATIO, Condition, Rule, RuleContext, format_layers, gradients_finite
from .profile import Cut, find_cuts, forward_order_known, gets_gradient

#: Module classes that can hold alternatives (experts, heads, branches) a router picks from.
ROUTABLE_CONTAINERS = ("ModuleList", "ModuleDict")
#: At most this many modules/parameters are remembered as "no gradient yet" (one small
#: record each), so the rule's memory and checkpoint stay bounded on any model.
MAX_TRACKED = 4096


@dataclass
class Absent:
    """A module (or one parameter of it) that has not received a gradient so far."""

    module: str
    param: str = ""  # "" for the whole module
    first_step: int = 0
    last_step: int = 0
    #: monitored steps at which it got none (steps where its zeros may be an underflow,
    #: a dead or a saturated layer are other rules' business and do not count)
    misses: int = 0
    #: seen running with a non-empty output on a detail step
    ran: bool = False
    #: its zeros were shown to be no gradient at all (behind a cut, detached, or not
    #: running), not an underflow: from then on every step without one counts
    shown: bool = False
    #: its gradient arrives as zeros (rather than .grad None)
    zero: bool = False
    #: the cut it sits behind, as last seen
    before: str = ""
    after: str = ""
    seen_in: str = ""
    level: float | None = None
    #: the indexed container (ModuleList/Sequential) whose other members get gradients
    container: str | None = None
    branch: str = ""

    @property
    def name(self) -> str:
        if not self.param:
            return self.module
        return f"{self.module}.{self.param}" if self.module else self.param


class NoGradient(Rule):
    code = "GW104"
    slug = "no-gradient"
    severity = "warning"
    summary = "parameters that require grad get no gradient"
    explanation = """\
What it measures: modules whose trainable parameters (requires_grad=True) have
never received a gradient: .grad stays None, or stays exactly 0 (as with
zero_grad(set_to_none=False)). Frozen parameters are not counted. A module that
has received a gradient at any monitored step is in use even if it misses some
(an expert without tokens in a batch, a branch not taken): it is never reported.

It reports one of three things, naming the modules:
- a blocked gradient: the modules run, but the gradient stops at an operation
  autograd cannot pass. It names the boundary: the last module before the block
  and the first one after it that gets a normal gradient. Vanishing (GW101)
  fades, so the layers next to an exactly-zero gradient are starved too; a block
  does not: the module right after it gets at least 1% of the late layers'
  gradient, or the gradient with respect to module outputs (measured on detail
  steps) never reaches the output before the block, or is exactly 0 there and
  normal right after it. Dead
  or saturated units at the boundary are GW201's or GW202's finding instead.
- a module never routed to: a member of a ModuleList (e.g. "experts.3") whose
  siblings get gradients never got one and was never seen running with input.
- an unused module or parameter: any other case.
- a loss cut off from the whole model: every watched .grad is None at two
  monitored steps in a row and the loss passed to watcher.step(loss=...) does not
  reach any watched parameter through its autograd graph (it was detached, or
  re-wrapped with requires_grad_()). Reported once, at once: nothing trains.
  Without that evidence (no loss passed) a step with no gradient at all is only
  said as a notice, with where watcher.step() belongs.

How long it waits: a module that runs at every step has the same graph at every
step, so `window` (3) monitored steps tell. A module that may be used only at
some steps (a ModuleList member not seen running, or any module once some module
of the model got gradients at some steps and not at others) is reported after n
monitored steps without any gradient, where n is the number after which a module
that gets one at a share `min_use` of the steps would have shown one with
probability 1 - `miss_chance`: n = ceil(ln(miss_chance) / ln(1 - min_use)),
44 monitored steps with the defaults 0.1 and 0.01 (660 steps at every 15).
Members of a ModuleList or ModuleDict are also followed at every step (a flag set
when one of their parameters receives a gradient): a member that never got one
in n steps, counted at every step, is reported then, at the first monitored step
after that (within 60 steps at the defaults); a member that gets a gradient at
any step, as the experts of a balanced mixture do, is never reported.

Why it matters: such parameters are trained by nothing. A quantiser
(torch.round), argmax, a comparison, an integer cast, .detach(), .data, .item()
or torch.no_grad() between a module and the loss leaves everything before it
untrained; an expert the router never picks keeps its initial weights; a module
that is never wired in only costs memory.

How to fix it: let a blocked gradient through with a straight-through
estimator, x + (q(x) - x).detach() (the forward pass uses q(x), the backward
pass treats q as the identity), or a differentiable relaxation (Gumbel-softmax);
remove a detach that is a mistake. For an expert the router never picks, add a
load-balancing loss, router noise or a capacity limit. Wire in a module that is
never used, or freeze it (requires_grad_(False)) or exclude it from watch()."""
    defaults: dict[str, float] = {"min_use": 0.1, "miss_chance": 0.01}
    threshold_docs = {
        "min_use": "share of steps at which a conditionally used module must get a "
        "gradient to count as trained (sets how long gradwatch waits)",
        "miss_chance": "accepted chance that a module used at min_use of the steps shows "
        "no gradient over the whole wait",
    }
    threshold_specs = {"min_use": RATIO, "miss_chance": RATIO}
    window = 3

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        self._absent: dict[str, Absent] = {}
        self._started = False
        #: (module, step) where a gradient was first seen to come and go, if ever
        self._conditional: tuple[str, int] | None = None
        self._full = False
        self._routable = True

    # -- how long to wait ------------------------------------------------------------

    def patience(self) -> int:
        """Monitored steps without a gradient after which a module that may be used
        conditionally is reported: ceil(ln(miss_chance) / ln(1 - min_use)).

        >>> NoGradient().patience(), NoGradient(min_use=0.2).patience()
        (44, 21)
        """
        use = min(max(self.t("min_use"), 1e-6), 1.0 - 1e-9)
        chance = min(max(self.t("miss_chance"), 1e-12), 1.0 - 1e-9)
        return max(self.window, math.ceil(math.log(chance) / math.log(1.0 - use)))

    def _required(self, entry: Absent, *, every_step: bool = False) -> int:
        """Monitored steps (or, with ``every_step``, steps counted at every step) without
        a gradient after which ``entry`` is reported."""
        if every_step:
            # Per-step evidence only speeds up the wait for members that may be routed.
            return self.patience() if _unrouted(entry) else MAX_STEPS
        if entry.ran:
            return self.window  # it runs at every step: the graph is the same each time
        if self._conditional is not None or entry.container is not None:
            return self.patience()
        return self.window

    # -- the check ---------------------------------------------------------------------

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        if not gradients_finite(stats):
            return None  # GW103's business
        cuts = {name: cut for cut in find_cuts(stats, ctx.recent(16)) for name in cut.blocked}
        known = forward_order_known(stats)
        first = not self._started
        self._started = True
        # Members of a Sequential all run at every step; only a ModuleList or ModuleDict
        # can hold alternatives that a router picks from.
        self._routable = ctx.model.uses(*ROUTABLE_CONTAINERS)
        params: dict[str, list[Absent]] = {}
        for entry in self._absent.values():
            if entry.param:
                params.setdefault(entry.module, []).append(entry)
        absent = self._absent
        for layer in stats.by_depth():
            if layer.grad_norm is None and not layer.missing_grad:
                continue  # no trainable parameters of its own
            if (
                not layer.missing_grad
                and gets_gradient(layer)
                and layer.name not in absent
                and layer.name not in params
            ):
                continue  # the usual module: every parameter got a gradient, none tracked
            self._observe_module(layer, stats, cuts.get(layer.name), known, first)
            self._observe_params(layer, params.get(layer.name, ()), stats.step, first)
        every_step = stats.steps_without_gradient
        due = [
            e
            for e in self._absent.values()
            if e.misses
            and (
                e.misses >= self._required(e)
                or _steps_without(e, every_step) >= self._required(e, every_step=True)
            )
        ]
        # A cut is one finding: once any module behind it is certain, all of them are
        # reported (they sit behind the same boundary).
        edges = {(e.before, e.after) for e in due if e.before and not e.param}
        listed = {id(e) for e in due}
        due += [
            e
            for e in self._absent.values()
            if id(e) not in listed and e.misses and (e.before, e.after) in edges
        ]
        return self._conditions(due, stats)

    def _observe_module(
        self, layer: LayerStats, stats: StepStats, cut: Cut | None, known: bool, first: bool
    ) -> None:
        got = gets_gradient(layer)
        entry = self._absent.get(layer.name)
        if got:
            if entry is not None:
                self._forget(entry, stats.step)
            return
        never_ran = known and layer.depth is None
        ran = stats.detail and layer.calls > 0 and layer.output_rms is not None
        # not called at this detail step, or called with nothing to compute (an expert
        # given an empty batch of tokens)
        skipped = stats.detail and stats.activations_observed and not ran
        detached = ran and layer.output_grad_rms is None  # autograd never reached its output
        # .grad None: no autograd path. Exact zeros count only once a cut, a detached
        # output or a module that did not run has explained them: otherwise they may be
        # an underflow (GW101's), dead or saturated units (GW201's, GW202's).
        shown = cut is not None or never_ran or skipped or detached
        miss = layer.grad_norm is None or shown or (entry is not None and entry.shown)
        if entry is None:
            if not first:
                if miss and not self._full:
                    self._note_conditional(layer.name, stats.step)  # it got one before
                return
            entry = self._track(Absent(layer.name, first_step=stats.step))
            if entry is None:
                return
        entry.ran = entry.ran or ran
        entry.shown = entry.shown or shown
        entry.zero = layer.grad_norm == 0.0
        if cut is not None and not skipped:
            entry.before, entry.after, entry.seen_in = cut.before, cut.after, cut.seen_in
            entry.level = cut.level
        if entry.container is None and self._routable:
            entry.container, entry.branch = _container(layer.name, stats)
        if miss:
            entry.misses += 1
            entry.last_step = stats.step

    def _observe_params(
        self, layer: LayerStats, tracked: Sequence[Absent], step: int, first: bool
    ) -> None:
        """Parameters without a gradient in a module whose other parameters get one."""
        if not gets_gradient(layer):
            return
        for entry in tracked:
            if entry.param not in layer.missing_grad:
                self._forget(entry, step)
        prefix = f"{layer.name}." if layer.name else ""
        for param in layer.missing_grad:
            key = prefix + param
            entry = self._absent.get(key)
            if entry is None:
                if not first:
                    if not self._full:
                        self._note_conditional(key, step)
                    continue
                entry = self._track(Absent(layer.name, param, first_step=step))
                if entry is None:
                    continue
            entry.misses += 1
            entry.last_step = step

    def _track(self, entry: Absent) -> Absent | None:
        if len(self._absent) >= MAX_TRACKED:
            self._full = True
            return None
        self._absent[entry.name] = entry
        return entry

    def _forget(self, entry: Absent, step: int) -> None:
        # Missed some steps without running, now it gets a gradient: used conditionally.
        # (One that ran all along and only now gets a gradient was held at zero, as
        # behind a zero-initialised residual gate: that says nothing about routing.)
        if entry.misses and not entry.ran:
            self._note_conditional(entry.name, step)
        del self._absent[entry.name]

    def _note_conditional(self, name: str, step: int) -> None:
        if self._conditional is None:
            self._conditional = (name, step)

    # -- findings ----------------------------------------------------------------------

    def _conditions(self, due: list[Absent], stats: StepStats) -> list[Condition]:
        blocked: dict[tuple[str, str], list[Absent]] = {}
        unrouted: dict[str, list[Absent]] = {}
        rest: list[Absent] = []
        for entry in due:
            if entry.param:
                rest.append(entry)
            elif entry.before:
                blocked.setdefault((entry.before, entry.after), []).append(entry)
            elif _unrouted(entry):
                unrouted.setdefault(entry.container or "", []).append(entry)
            else:
                rest.append(entry)
        for edge, group in list(blocked.items()):
            # Modules behind a cut that may all simply not have been picked (and were
            # never seen running) are a routing question, not a blocked gradient.
            if all(_unrouted(e) for e in group):
                del blocked[edge]
                for entry in group:
                    unrouted.setdefault(entry.container or "", []).append(entry)
        out = [self._blocked(group, stats) for group in blocked.values()]
        out += [self._unrouted(c, group, stats) for c, group in unrouted.items()]
        if rest:
            out.append(self._unused(rest, stats))
        return out

    def _span(self, group: list[Absent], stats: StepStats) -> dict[str, Any]:
        every_step = stats.steps_without_gradient
        return {
            "monitored_steps": max(e.misses for e in group),
            "steps": max((_steps_without(e, every_step) for e in group), default=0) or None,
            "first_step": min(e.first_step for e in group),
            "required_steps": max(self._required(e) for e in group),
            "conditional_use_seen": self._conditional is not None,
        }

    def _blocked(self, group: list[Absent], stats: StepStats) -> Condition:
        last = group[-1]
        before, after = display_name(last.before), display_name(last.after)
        names = [e.name for e in group]
        zero = any(e.zero for e in group)
        span = self._span(group, stats)
        how = "a gradient of exactly 0" if zero else "no gradient at all (.grad is None)"
        verb = "ran but got" if any(e.ran for e in group) else "got"
        message = (
            f"the gradient stops between {before} and {after}: {format_layers(names)} "
            f"{verb} {how} at every monitored step ({span['monitored_steps']} "
            f"since step {span['first_step']}), while {after}, right after the cut, "
        )
        if last.level is not None:
            message += f"gets {last.level:.2g} x the late layers' gradient"
        else:
            message += "gets a gradient"
        if zero and last.seen_in != "no graph":
            hint = (
                f"An operation between the output of {before} and {after} has a "
                "derivative of 0 everywhere: rounding or quantisation (torch.round, "
                "floor, ceil), sign or a step function. Let the gradient through with a "
                "straight-through estimator, q = x + (quantise(x) - x).detach(): the "
                "forward pass uses the quantised value, the backward pass treats the "
                "quantiser as the identity. Or use a differentiable relaxation."
            )
        else:
            hint = (
                f"Between the output of {before} and {after}, something takes the values "
                "out of the autograd graph: .detach(), .data, argmax, a comparison "
                "(x > 0), an integer cast (.long(), .int(), .to(torch.int8)), .item(), "
                ".numpy() or torch.no_grad(). Remove the detach if it is a mistake; if the "
                "discrete step is intended, use a straight-through estimator, "
                "x + (q(x) - x).detach() (for argmax: one_hot + soft - soft.detach() with "
                "soft = softmax(logits)), or Gumbel-softmax."
            )
        evidence: dict[str, Any] = {
            "before": last.before,
            "after": last.after,
            "modules": len(names),
            "gradient": "zero" if zero else "none",
            "seen_in": last.seen_in,
            "after_level": last.level,
            "order": "forward" if forward_order_known(stats) else "registration",
            **span,
        }
        return Condition(
            layers=tuple(names),
            message=message,
            hint=hint,
            evidence=evidence,
            score=float(len(names)),
            key=f"blocked:{last.before}",
            window=1,  # the evidence was gathered over the monitored steps counted above
        )

    def _unrouted(self, container: str, group: list[Absent], stats: StepStats) -> Condition:
        branches = list(dict.fromkeys(e.branch for e in group))
        siblings = _receiving_siblings(container, branches, stats)
        span = self._span(group, stats)
        label = container or "the model's top-level Sequential"
        ran = " and never ran on any input" if forward_order_known(stats) else ""
        counted = (
            f"{span['steps']} steps, checked at every step"
            if span["steps"]
            else f"{span['monitored_steps']} monitored steps"
        )
        message = (
            f"{format_layers(branches)} never received a gradient in {counted} "
            f"(since step {span['first_step']}){ran}, while other members of {label} get "
            "gradients"
        )
        if siblings:
            message += f" ({format_layers(siblings, 3)} at this step)"
        hint = (
            f"A router or gate never selects {format_layers(branches)}: with top-k routing "
            "an expert that gets no tokens gets no gradient, so its router score never "
            "improves either. Balance the routing: add a load-balancing loss (e.g. Switch "
            "Transformer's auxiliary loss), router noise or an expert capacity limit, or "
            f"remove the unused member of {label}. If it is a task head, check that its "
            "loss is part of the total."
        )
        return Condition(
            layers=tuple(e.name for e in group),
            message=message,
            hint=hint,
            evidence={"container": container, "branches": branches, **span},
            score=float(len(group)),
            key=f"unrouted:{container}",
            window=1,
        )

    def _unused(self, group: list[Absent], stats: StepStats) -> Condition:
        params = [e.name for e in group if e.param]
        modules = [e for e in group if not e.param]
        known = forward_order_known(stats)
        never_ran = [e.name for e in modules if known and not e.ran]
        ran = [e.name for e in modules if e.ran]
        unknown = [e.name for e in modules if not known and not e.ran]
        span = self._span(group, stats)
        parts = []
        if modules:
            parts.append(
                f"{format_layers([e.name for e in modules])} got no gradient in "
                f"{span['monitored_steps']} monitored steps (since step {span['first_step']})"
            )
        if params:
            parts.append(
                f"{len(params)} parameter(s) got no gradient while the rest of their module "
                f"did ({format_layers(params)})"
            )
        hints = []
        if ran:
            hints.append(
                f"{format_layers(ran)} ran in the forward pass, so its output is detached "
                "from the loss: look for .detach(), .item(), .numpy(), .data or "
                "torch.no_grad() between it and the loss."
            )
        if never_ran:
            hints.append(
                f"{format_layers(never_ran)} never ran in the forward pass (or only under "
                "torch.no_grad()): wire it in, or freeze/remove it if it is unused on purpose."
            )
        if params:
            hints.append(
                f"{format_layers(params)} is not used by its module's forward pass: use "
                "it, or freeze/remove it."
            )
        if unknown or not hints:
            hints.append(
                "Follow these modules' outputs to the loss: a .detach(), .item() or "
                "torch.no_grad() cuts the graph; wire in a module that never runs; freeze "
                "them if they are unused on purpose."
            )
        return Condition(
            layers=tuple(e.name if not e.param else e.module for e in group),
            message="; ".join(parts),
            hint=" ".join(hints),
            evidence={
                "parameters": len(params),
                "modules": len(modules),
                "never_ran": len(never_ran),
                **span,
            },
            score=float(len(group)),
            window=1,
        )

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "started": self._started,
            "conditional": list(self._conditional) if self._conditional else None,
            "full": self._full,
            "absent": [asdict(e) for e in self._absent.values()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._started = bool(state.get("started", False))
        conditional = state.get("conditional")
        self._conditional = (str(conditional[0]), int(conditional[1])) if conditional else None
        self._full = bool(state.get("full", False))
        known = {f.name for f in fields(Absent)}
        self._absent = {}
        for item in list(state.get("absent", []))[:MAX_TRACKED]:
            entry = Absent(**{k: v for k, v in dict(item).items() if k in known})
            self._absent[entry.name] = entry


#: Effectively "never" for :meth:`NoGradient._required` with per-step evidence.
MAX_STEPS = 2**62


def _steps_without(entry: Absent, every_step: Mapping[str, int]) -> int:
    """Steps (counted at every step) that the container member holding ``entry`` went
    without any gradient; 0 when it is not followed at every step."""
    if not every_step:
        return 0
    parts = entry.module.split(".")
    for cut in range(len(parts), 0, -1):
        found = every_step.get(".".join(parts[:cut]))
        if found is not None:
            return found
    return 0


def _unrouted(entry: Absent) -> bool:
    """A member of a routable container whose siblings get gradients, never seen running."""
    return entry.container is not None and not entry.ran


def _indexed_positions(name: str) -> list[int]:
    """Positions of the name's integer components, innermost first ("experts.3.0" -> 2, 1)."""
    parts = name.split(".") if name else []
    return [i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()]


def _container(name: str, stats: StepStats) -> tuple[str | None, str]:
    """The innermost indexed container around ``name`` (a ModuleList or Sequential, seen
    from the names: "experts.3" is member 3 of "experts") whose other members get
    gradients at this step, and the member ``name`` belongs to."""
    parts = name.split(".")
    for i in _indexed_positions(name):
        container = ".".join(parts[:i])
        branch = ".".join(parts[: i + 1])
        if _receiving_siblings(container, [branch], stats):
            return container, branch
    return None, ""


def _receiving_siblings(container: str, branches: list[str], stats: StepStats) -> list[str]:
    """Members of ``container`` other than ``branches`` with a gradient at this step."""
    members = _receiving_members(stats).get(container, ())
    return [m for m in members if m not in branches]


def _receiving_members(stats: StepStats) -> dict[str, list[str]]:
    """For each indexed container: its members (names) that got a gradient at this step.
    Built once per step."""
    cached = stats.__dict__.get("_receiving_members")
    if cached is not None:
        return cached
    members: dict[str, dict[str, None]] = {}  # ordered sets
    for layer in stats:
        if not gets_gradient(layer):
            continue
        parts = layer.name.split(".")
        for i in _indexed_positions(layer.name):
            container, member = ".".join(parts[:i]), ".".join(parts[: i + 1])
            members.setdefault(container, {})[member] = None
    out = {container: list(found) for container, found in members.items()}
    stats.__dict__["_receiving_members"] = out
    return out
