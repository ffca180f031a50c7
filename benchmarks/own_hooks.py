"""Keep each benchmarked copy's global module hooks to itself.

gradwatch arms its probes as process-wide module hooks ahead of a monitored step, and a
global hook slows down every module call in the process. A benchmark that trains several
copies side by side (bare, gradwatch, peers) would otherwise charge the copies stepping
while a gradwatch copy is armed with gradwatch's hooks, inflating the bare loop and hiding
part of gradwatch's cost.
"""

from __future__ import annotations

import torch

#: torch's process-wide module hook tables (gradwatch arms its probes there, and only
#: ahead of a monitored step)
_GLOBAL_HOOKS = [
    getattr(torch.nn.modules.module, name)
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_forward_hooks_always_called",
        "_global_forward_hooks_with_kwargs",
    )
    if hasattr(torch.nn.modules.module, name)
]


class OwnHooks:
    """Only one copy's global module hooks present while that copy runs.

    Everything a copy does that can place or remove hooks (building its watcher, its
    steps, closing) runs inside ``with copy_hooks:``; the hooks it leaves behind are put
    aside while other copies run and put back for its own next turn.

    >>> from torch import nn
    >>> from torch.nn.modules.module import register_module_forward_hook
    >>> mine, other = OwnHooks(), OwnHooks()
    >>> with mine:
    ...     handle = register_module_forward_hook(lambda module, args, output: None)
    >>> with other:
    ...     len(torch.nn.modules.module._global_forward_hooks)
    0
    >>> with mine:
    ...     len(torch.nn.modules.module._global_forward_hooks)
    ...     handle.remove()
    1
    """

    def __init__(self) -> None:
        self.owned: list[dict] = [{} for _ in _GLOBAL_HOOKS]

    def __enter__(self) -> OwnHooks:
        self.others: list[dict] = []
        for table, owned in zip(_GLOBAL_HOOKS, self.owned):
            foreign = {key: value for key, value in table.items() if key not in owned}
            for key in foreign:
                del table[key]
            self.others.append(foreign)
        return self

    def __exit__(self, *exc: object) -> None:
        for table, owned, foreign in zip(_GLOBAL_HOOKS, self.owned, self.others):
            owned.clear()
            owned.update(table)  # what is left now is this copy's own
            table.update(foreign)
