"""Statistics as flat ``{key: number}`` metrics, for reporters that feed metric loggers
(Lightning loggers, W&B)."""

from __future__ import annotations

from collections.abc import Sequence

from ..stats import LayerStats, StepStats

#: Per-layer statistics a metrics reporter may log: fields of :class:`LayerStats`, plus
#: ``active_fraction``, the share of a ReLU layer's units active in the step's batch.
LAYER_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_max",
    "grad_zero_fraction",
    "grad_nonfinite",
    "param_norm",
    "param_rms",
    "output_rms",
    "output_grad_norm",
    "output_grad_rms",
    "active_fraction",
    "saturated_fraction",
    "mean_derivative",
    "update_ratio",
)
#: What metrics reporters log per layer unless told otherwise (the activation shares exist
#: only for ReLU and sigmoid/tanh modules).
DEFAULT_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "active_fraction",
    "saturated_fraction",
    "update_ratio",
)


def check_stats(names: Sequence[str], option: str = "stats") -> tuple[str, ...]:
    """Validate statistic names against :data:`LAYER_STATS`."""
    unknown = [s for s in names if s not in LAYER_STATS]
    if unknown:
        raise ValueError(
            f"{option}: unknown statistic(s) {unknown}; choose from {', '.join(LAYER_STATS)}"
        )
    return tuple(names)


def stat_value(layer: LayerStats, stat: str) -> float | None:
    """One per-layer statistic as a float, or ``None`` when it was not measured."""
    if stat == "active_fraction":
        mask = layer.active_units
        return mask.fraction() if mask is not None and mask.size else None
    value = getattr(layer, stat, None)
    if value is None or isinstance(value, bool):
        return None
    return float(value)


def spread(items: Sequence, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced, keeping the first and the last.

    >>> spread([str(i) for i in range(10)], 4)
    ['0', '3', '6', '9']
    """
    if limit is None or len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


class LayerSelection:
    """The layers a metrics reporter logs: chosen once, at the first step that measured
    any of the statistics, so that logged columns (and dashboard panels) stay stable."""

    def __init__(self, stats: Sequence[str], max_layers: int | None) -> None:
        self.stats = tuple(stats)
        self.max_layers = max_layers
        self.names: list[str] | None = None
        self.candidates = 0

    def pick(self, step: StepStats) -> list[str]:
        if not self.stats:
            return []
        if self.names is None:
            candidates = [
                s.name
                for s in step.by_depth()
                if any(stat_value(s, stat) is not None for stat in self.stats)
            ]
            if not candidates:
                return []  # nothing measured yet: decide at a later step
            self.candidates = len(candidates)
            self.names = spread(candidates, self.max_layers)
        return self.names

    def metrics(self, step: StepStats, prefix: str) -> dict[str, float]:
        """``{prefix}/<stat>/<layer>`` for the chosen layers (``root`` for the root module)."""
        out: dict[str, float] = {}
        for name in self.pick(step):
            layer = step.layers.get(name)
            if layer is None:
                continue
            for stat in self.stats:
                value = stat_value(layer, stat)
                if value is not None:
                    out[f"{prefix}/{stat}/{name or 'root'}"] = value
        return out


def global_metrics(step: StepStats, prefix: str) -> dict[str, float]:
    """The global gradient (and, when known, parameter) norm."""
    out = {f"{prefix}/global_grad_norm": float(step.global_grad_norm)}
    if step.global_param_norm is not None:
        out[f"{prefix}/global_param_norm"] = float(step.global_param_norm)
    return out
