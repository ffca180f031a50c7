"""What the rules need to know about the optimizer that consumes the gradients."""

from __future__ import annotations

from typing import Any

import torch

from .stats import OptimizerInfo

# Optimizers that divide each gradient by a running estimate of its own scale: the size
# of a gradient barely matters to them, unless it falls towards their ``eps``.
_ADAPTIVE = {
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "SparseAdam",
    "Adafactor",
    "LAMB",
    "Lamb",
    "Lion",
}


def describe(optimizer: Any) -> OptimizerInfo | None:
    """Summarise a ``torch.optim.Optimizer`` (or anything with ``param_groups``).

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> describe(torch.optim.Adam([p], lr=1e-3))
    OptimizerInfo(name='Adam', lr=0.001, adaptive=True, eps=1e-08)
    """
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", None)  # Lightning's LightningOptimizer wrapper
    if inner is not None and hasattr(inner, "param_groups"):
        optimizer = inner
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    group = groups[0]
    name = type(optimizer).__name__
    lr = group.get("lr", 0.0)
    if isinstance(lr, torch.Tensor):
        if lr.is_cuda:
            return None  # a learning rate kept on the GPU: reading it would make it wait
        lr = lr.item()
    lr = float(lr)
    eps = group.get("eps")
    if isinstance(eps, (tuple, list)):  # Adafactor keeps (eps1, eps2)
        eps = eps[0]
    adaptive = name in _ADAPTIVE or ("betas" in group and "eps" in group)
    return OptimizerInfo(
        name=name, lr=lr, adaptive=adaptive, eps=float(eps) if eps is not None else None
    )
