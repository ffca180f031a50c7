"""Every-step evidence of which conditional modules get a gradient.

Members of a ``ModuleList``/``ModuleDict`` (experts, branches, heads) may be used at some
steps only. Gathered at monitored steps alone, the evidence that one is *never* used
takes 44 monitored steps (660 steps at the default interval). Per step it is cheap: one
post-accumulate-grad hook on one parameter of each member sets a flag when the member
gets a gradient, and is removed once it has: a member that has received a gradient is
in use, and the rules never report it. What stays hooked is only the members that
never got one (usually none), so a model whose members all train pays nothing after its
first steps. :meth:`RoutingEvidence.tick` (once per step) is a couple of operations.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Containers whose members a router or gate may pick from.
ROUTABLE = (nn.ModuleList, nn.ModuleDict)
#: Members followed at most (the first ones in model order).
MAX_MEMBERS = 512


class RoutingEvidence:
    """Counts, per member of a routable container, the steps it went without a gradient.

    >>> import torch
    >>> experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    >>> evidence = RoutingEvidence(experts, {id(p) for p in experts.parameters()})
    >>> for _ in range(5):
    ...     (experts[0](torch.ones(1, 2)).sum() + experts[1](torch.ones(1, 2)).sum()).backward()
    ...     evidence.tick()
    >>> evidence.without_gradient()
    {'2': 5}
    >>> evidence.close()
    """

    def __init__(self, root: nn.Module, watched: set[int]) -> None:
        self._names: list[str] = []
        self._handles: list[Any] = []  # None once the member got a gradient
        self._got: list[int] = []  # indices of members whose hook fired (filled by hooks)
        self._since: list[int] = []  # step count when each member started being followed
        self._steps = 0
        self._active = False  # counting starts at the first step where some member got one
        for name, module in root.named_modules():
            if not isinstance(module, ROUTABLE) or len(module) < 2:
                continue
            for child, member in module.named_children():
                param = _first_watched(member, watched)
                if param is None:
                    continue
                if len(self._names) >= MAX_MEMBERS:
                    continue
                self._handles.append(param.register_post_accumulate_grad_hook(
                    self._flag(len(self._names))))
                self._names.append(f"{name}.{child}" if name else child)
                self._since.append(0)

    def _flag(self, index: int) -> Any:
        got = self._got

        def on_gradient(param: Any) -> None:
            got.append(index)

        return on_gradient

    def tick(self) -> None:
        """One optimizer step has ended (called from ``watcher.step()``)."""
        if self._got:
            self._active = True
            for index in set(self._got):
                handle = self._handles[index]
                if handle is not None:
                    handle.remove()
                    self._handles[index] = None
            self._got.clear()
        if self._active:
            self._steps += 1

    def without_gradient(self) -> dict[str, int]:
        """Members that never got a gradient, with the steps counted since the first step
        at which some member got one (called at monitored steps)."""
        return {
            name: self._steps - since
            for name, handle, since in zip(self._names, self._handles, self._since)
            if handle is not None and self._steps > since
        }

    def state_dict(self) -> dict[str, int]:
        """The steps each member still hooked has gone without a gradient (for a resume)."""
        return self.without_gradient()

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name, steps in state.items():
            if name in self._names and int(steps) > 0:
                self._active = True
                self._since[self._names.index(name)] = self._steps - int(steps)

    @property
    def following(self) -> bool:
        """True while some member is still hooked (has not got a gradient yet)."""
        return any(handle is not None for handle in self._handles)

    def close(self) -> None:
        """Remove the hooks (what was counted stays readable, for a checkpoint)."""
        for handle in self._handles:
            if handle is not None:
                handle.remove()
        self._handles = [_Removed() if h is not None else None for h in self._handles]


class _Removed:
    """Stands for the hook of a member still without a gradient once the hooks are gone."""

    def remove(self) -> None:
        return None


def _first_watched(module: nn.Module, watched: set[int]) -> nn.Parameter | None:
    for param in module.parameters():
        if param.requires_grad and id(param) in watched:
            return param
    return None


__all__ = ["MAX_MEMBERS", "ROUTABLE", "RoutingEvidence"]
