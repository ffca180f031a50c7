"""What a loss scaler (``torch.amp.GradScaler``) means for the gradients gradwatch reads.

fp16 training multiplies the loss by a large scale before ``backward()`` so that small
gradients do not underflow, and divides the gradients back (``unscale_``) before the
optimizer uses them. While it calibrates, the scaler *deliberately* overflows: the
gradients hold Inf, it skips that optimizer step and halves the scale. So, with a
scaler known:

- gradient statistics are divided by the scale until the scaler has unscaled them
  (the scale itself travels to the host with the other statistics: no extra sync);
- Inf/NaN gradients at a finite loss scale are a skipped step, not a broken model; what
  is a problem is a scale that keeps falling (the model produces Inf/NaN at every scale)
  and non-finite weights.
"""

from __future__ import annotations

from typing import Any

import torch


def is_scaler(obj: Any) -> bool:
    """True for a ``torch.amp.GradScaler`` (or anything shaped like one: the CUDA and
    FSDP ``ShardedGradScaler`` subclasses, Lightning's and accelerate's scalers)."""
    return obj is not None and all(
        hasattr(obj, name) for name in ("scale", "unscale_", "update", "get_scale")
    )


def check_scaler(obj: Any) -> None:
    """Raise ``ValueError`` unless ``obj`` is None or a loss scaler."""
    if obj is not None and not is_scaler(obj):
        raise ValueError(
            f"scaler must be a torch.amp.GradScaler (the one passed to scaler.scale(loss)), "
            f"got {type(obj).__name__}"
        )


class ScalerView:
    """Reads a GradScaler's state without forcing a device sync."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    @property
    def enabled(self) -> bool:
        enabled = getattr(self.scaler, "_enabled", None)
        if enabled is None:
            is_enabled = getattr(self.scaler, "is_enabled", None)
            enabled = bool(is_enabled()) if callable(is_enabled) else True
        return bool(enabled) and self.scale_tensor() is not None

    def scale_tensor(self) -> torch.Tensor | None:
        """The current scale as a device tensor (``None`` before the first ``scale()``)."""
        scale = getattr(self.scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def unscaled(self, optimizer: Any) -> bool:
        """True when the scaler has already divided ``optimizer``'s gradients (an explicit
        ``scaler.unscale_(optimizer)``, as Lightning and accelerate do before clipping).
        With the optimizer unknown: when it has done so for any optimizer."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if not isinstance(states, dict):
            return False
        inner = getattr(optimizer, "optimizer", None)  # Lightning's LightningOptimizer
        candidates = [optimizer, inner] if optimizer is not None else []
        for candidate in candidates:
            if candidate is not None and id(candidate) in states:
                return _stage_name(states.get(id(candidate))) == "UNSCALED"
        return any(_stage_name(state) == "UNSCALED" for state in list(states.values()))


def _stage_name(state: Any) -> str:
    stage = state.get("stage") if isinstance(state, dict) else None
    return getattr(stage, "name", str(stage))
