"""What a forward hook needs to know about the pass it sees: whether gradients are on,
whether torch.compile is tracing it, and whether it is a recomputation inside a backward
pass (activation checkpointing). Shared by the activation probes and the attention
capture, which both run only during the model's own training forward passes."""

from __future__ import annotations

from typing import Any

import torch


def _never() -> bool:
    return False


#: True while torch.compile traces: hooks must stay out of the graphs it builds.
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _never)
#: True when autograd records the pass (a training pass, not validation under no_grad).
grad_enabled = torch.is_grad_enabled
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True inside a backward pass: a forward hook then sees activation checkpointing
    recompute its segment, not the model's own forward pass."""
    return _graph_task_id is not None and _graph_task_id() != -1


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        items: Any = output
    elif isinstance(output, dict):
        items = output.values()
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None
