"""Turn gradients and probe records into one vector on the device, and that vector into
:class:`~gradwatch.stats.StepStats` on the host.

The device side does every reduction with batched ops and concatenates the results
into a single float64 vector, so a monitored step costs one device-to-host transfer.
A :class:`Layout` (plain Python, built alongside) says how to read it back.

The vector holds, in order: values summed across ranks (squared gradient norms per
parameter; on detail steps also non-zero counts and squared parameter norms; squared
probe norms; saturation counts; the input's squared norm), element counts (also
summed across ranks), maxima (max |g| per parameter, on detail steps) and bit-packed
masks (gradient rows and active units that are non-zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributed import Reducer
from .layers import UNIT_ROW_KINDS, LayerInfo
from .probes import ProbeRecord
from .stats import LayerStats, OptimizerInfo, StepStats, UnitMask

_F32 = torch.float32
_F64 = torch.float64

try:  # DTensor (FSDP2 shards, tensor parallel); absent on old builds
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:
    try:
        from torch.distributed._tensor import DTensor as _DTensor
    except Exception:
        _DTensor = None


@dataclass(slots=True)
class Slot:
    """One parameter with a gradient at this step."""

    layer: int
    name: str
    # local values (a shard's own part under FSDP2); dropped once measured, so that a
    # statistics vector still in flight (deferred) does not keep old gradients alive
    grad: torch.Tensor | None
    param: torch.Tensor
    numel: int  # global number of elements
    sharded: bool
    rows: int = 0  # > 0: a Linear/Conv weight whose rows are output units
    has_values: bool = True


@dataclass
class Layout:
    """How to read the packed vector back."""

    step: int
    slots: list[Slot]
    missing: dict[int, list[str]]
    detail: bool
    out_entries: list[int]  # layer index of each forward norm
    grad_entries: list[int]  # layer index of each backward-signal norm
    saturating: list[int]
    relu_units: list[tuple[int, int]]  # (layer index, units)
    positive_units: list[tuple[int, int]]  # (layer index, units) of Linear/Conv outputs
    has_input: bool
    order: dict[int, int]
    calls: dict[int, int]
    n_max: int


def _local(grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if _DTensor is not None and isinstance(grad, _DTensor):
        return grad.to_local(), True
    return grad, False


def param_table(layers: list[LayerInfo]) -> list[tuple[int, str, torch.Tensor, int, bool]]:
    """(layer index, name, parameter, numel, rows are units) for every watched parameter."""
    table = []
    for layer in layers:
        unit_rows = layer.kind in UNIT_ROW_KINDS
        for pname, param in layer.params:
            rows = unit_rows and pname == "weight" and param.dim() >= 2
            table.append((layer.index, pname, param, param.numel(), rows))
    return table


def gather_slots(
    table: list[tuple[int, str, torch.Tensor, int, bool]],
) -> tuple[list[Slot], dict[int, list[str]]]:
    """Parameters with a gradient (unit-row weights first) and those without one."""
    row_slots: list[Slot] = []
    other_slots: list[Slot] = []
    missing: dict[int, list[str]] = {}
    plain = torch.Tensor
    for index, pname, param, numel, rows in table:
        grad = param.grad
        if grad is None:
            missing.setdefault(index, []).append(pname)
            continue
        if type(grad) is plain:
            sharded = False
        else:
            grad, sharded = _local(grad)
        has_values = grad.numel() > 0
        if rows and not sharded:
            row_slots.append(
                Slot(index, pname, grad, param, numel, False, grad.shape[0], has_values)
            )
        else:
            other_slots.append(Slot(index, pname, grad, param, numel, sharded, 0, has_values))
    return row_slots + other_slots, missing


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not tensors:
        return []
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=_F32))
    except (TypeError, RuntimeError, AttributeError):  # older builds: no dtype argument
        return [torch.linalg.vector_norm(t, dtype=_F32) for t in tensors]


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean vector into bytes (float values 0..255, exact), bit i = element i."""
    weights = _BIT_WEIGHTS.get(mask.device)
    if weights is None:
        weights = torch.tensor([1 << i for i in range(8)], dtype=_F32, device=mask.device)
        _BIT_WEIGHTS[mask.device] = weights
    pad = (-mask.numel()) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    return mask.to(_F32).view(-1, 8) @ weights


def unpack_bits(values: list[float]) -> int:
    return int.from_bytes(bytes(map(int, values)), "little")


def _row_norms(grad: torch.Tensor) -> torch.Tensor:
    rows = grad.flatten(1)
    if rows.dtype == _F32:  # asking for a dtype it already has takes a slower path
        return torch.linalg.vector_norm(rows, dim=1)
    return torch.linalg.vector_norm(rows, dim=1, dtype=_F32)


#: Zero shares of larger gradients are estimated from this many evenly strided entries
#: (standard error <= 0.8 percentage points); smaller ones are counted exactly.
ZERO_SAMPLE = 4096


def _nonzero_count(grad: torch.Tensor) -> torch.Tensor:
    """Number of non-zero entries (a float32 scalar). Counting every entry of a large
    tensor costs more than the rest of a monitored step, so those are estimated from a
    strided sample."""
    flat = grad.reshape(-1)
    n = flat.numel()
    if n <= ZERO_SAMPLE:
        return torch.count_nonzero(flat).to(_F32)
    stride = n // ZERO_SAMPLE
    stride += stride % 2 == 0  # odd: the samples walk across the columns of a matrix
    sample = flat[::stride]
    return torch.count_nonzero(sample).to(_F32) * (n / sample.numel())


def _param_sumsq(slots: list[Slot], device: torch.device) -> torch.Tensor:
    """Squared norm of each slot's parameter (its local shard under FSDP2), float32."""
    params = [_local(s.param.detach())[0] for s in slots]
    return _stack(_norms(params), device).square()


def _stack(scalars: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if any(t.device != device for t in scalars):
        scalars = [t.to(device) for t in scalars]
    return torch.stack(scalars)


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if any(p.device != device for p in parts):
        parts = [p.to(device) for p in parts]
    return torch.cat(parts)


def _vector(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate float32 pieces (moving any that sit elsewhere) into one float64 vector."""
    if not parts:
        return torch.zeros(0, dtype=_F64, device=device)
    return _cat(parts, device).to(_F64)


class Collector:
    """Computes the statistics of a monitored step on the gradients' device."""

    def __init__(self, layers: list[LayerInfo], reducer: Reducer) -> None:
        self.table = param_table([layer for layer in layers if layer.params])
        self.reducer = reducer
        self._segment_cache: dict[tuple, torch.Tensor] = {}

    def measure(
        self, step: int, record: ProbeRecord, *, detail: bool
    ) -> tuple[torch.Tensor, Layout] | None:
        slots, missing = gather_slots(self.table)
        if not slots:
            return None
        home = slots[0].grad.device
        world = self.reducer.world_size
        sums: list[torch.Tensor] = []  # 1-D pieces, summed across ranks
        masks: list[torch.Tensor] = []  # > 0 means "set"; summed across ranks

        row_slots = [s for s in slots if s.rows]
        other = [s for s in slots if not s.rows]
        if row_slots:
            row_norms = _cat([_row_norms(s.grad) for s in row_slots], home)
            energy = row_norms * row_norms
            segments = self._segments(tuple(s.rows for s in row_slots), home)
            per_tensor = torch.zeros(len(row_slots), dtype=_F32, device=home)
            sums.append(per_tensor.index_add_(0, segments, energy))
            masks.append(energy)
        if other:
            sums.append(_stack(_norms([s.grad for s in other]), home).square())

        maxima = None
        with_values = [s for s in slots if s.has_values] if detail else []
        if detail:
            sums.append(_stack([_nonzero_count(s.grad) for s in slots], home))
            sums.append(_param_sumsq(slots, home))
            if with_values:
                maxima = _stack([s.grad.abs().amax().to(_F32) for s in with_values], home)

        n_scaled = len(slots) * (3 if detail else 1)
        if record.out_norms:
            sums.append(_stack([n for _, n, _ in record.out_norms], home).square())
        if record.grad_norms:
            sums.append(_stack([n for _, n, _ in record.grad_norms], home).square())
        saturating = sorted(record.saturated)
        if saturating:
            pairs = [t for i in saturating for t in (record.saturated[i], record.derivative_sum[i])]
            sums.append(_stack(pairs, home))
        has_input = record.input_norm is not None
        if record.input_norm is not None:
            sums.append(record.input_norm.to(home).square().reshape(1))
        relu_units = [(i, record.unit_activity[i].numel()) for i in sorted(record.unit_activity)]
        masks.extend(record.unit_activity[i] for i, _ in relu_units)
        positive_units = [(i, int(record.positive[i].numel())) for i in sorted(record.positive)]
        masks.extend(record.positive[i] for i, _ in positive_units)

        # Counts that can differ between ranks travel with the sums.
        counts = [float(n) for _, _, n in record.out_norms]
        counts += [float(n) for _, _, n in record.grad_norms]
        counts += [float(record.activation_numel[i]) for i in saturating]
        if has_input:
            counts.append(float(record.input_numel))

        summed = _vector(sums, home)
        if world > 1:
            # Replicated gradients (DDP) are equal on every rank already: divide them by
            # the world size so that the sum across ranks gives them back unchanged.
            scale = [1.0] * summed.numel()
            for block in range(n_scaled // len(slots)):
                for k, slot in enumerate(slots):
                    if not slot.sharded:
                        scale[block * len(slots) + k] = 1.0 / world
            summed = summed * torch.tensor(scale, dtype=_F64, device=home)
        count_vec = torch.tensor(counts, dtype=_F64, device=home)
        mask_vec = _cat(masks, home) if masks else torch.zeros(0, device=home)
        max_vec = maxima.to(_F64) if maxima is not None else torch.zeros(0, dtype=_F64, device=home)
        summed, count_vec, mask_vec, max_vec = self.reducer.reduce(
            summed, count_vec, mask_vec, max_vec
        )
        packed = torch.cat([summed, count_vec, max_vec, pack_bits(mask_vec > 0).to(_F64)])
        for slot in slots:
            slot.grad = None
        layout = Layout(
            step=step,
            slots=slots,
            missing=missing,
            detail=detail,
            out_entries=[i for i, _, _ in record.out_norms],
            grad_entries=[i for i, _, _ in record.grad_norms],
            saturating=saturating,
            relu_units=relu_units,
            positive_units=positive_units,
            has_input=has_input,
            order=dict(record.order),
            calls=dict(record.calls),
            n_max=len(with_values) if maxima is not None else 0,
        )
        return packed, layout

    def _segments(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (rows, str(device))
        cached = self._segment_cache.get(key)
        if cached is None:
            counts = torch.tensor(rows, device=device)
            cached = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
            if len(self._segment_cache) > 16:
                self._segment_cache.clear()
            self._segment_cache[key] = cached
        return cached

    @staticmethod
    def inspect_nonfinite(slots: list[Slot]) -> tuple[list[int], list[float]]:
        """Exact NaN/Inf counts per gradient and squared norms of the parameters (are the
        weights themselves poisoned?). A second, small transfer, made only on a step that
        already showed non-finite gradients."""
        if not slots:
            return [], []
        grads = [_local(s.param.grad)[0] for s in slots]  # still this step's: read at once
        counts = torch.stack([(~torch.isfinite(g)).sum().to(_F64) for g in grads])
        values = torch.cat([counts, _param_sumsq(slots, counts.device).to(_F64)]).tolist()
        return [int(v) for v in values[: len(slots)]], values[len(slots) :]


def _sqrt(value: float) -> float:
    return math.sqrt(value) if value >= 0 else (value if value != value else 0.0)


def _per_module(
    indices: list[int], squares: list[float], counts: list[float]
) -> dict[int, tuple[float, float]]:
    """Probe entries (one per call) summed per module: a module called twice adds its
    squares and its element counts."""
    total: dict[int, tuple[float, float]] = {}
    for index, sq, count in zip(indices, squares, counts):
        before = total.get(index, (0.0, 0.0))
        total[index] = (before[0] + sq, before[1] + count)
    return total


def read(
    values: list[float],
    layout: Layout,
    layers: list[LayerInfo],
    depth: dict[int, float],
    optimizer: OptimizerInfo | None,
    nonfinite: tuple[list[int], list[float]] | None = None,
    previous: StepStats | None = None,
) -> StepStats:
    """Build the host-side :class:`StepStats` from the transferred vector.

    On steps without detail, parameter norms are carried over from ``previous`` (they
    change slowly), so rules can always compare gradients with weights.
    """
    slots = layout.slots
    n = len(slots)
    pos = 0
    nonfinite_counts, checked_param_sumsq = nonfinite if nonfinite is not None else (None, None)

    def take(count: int) -> list[float]:
        nonlocal pos
        out = values[pos : pos + count]
        pos += count
        return out

    sumsq = take(n)
    nonzero = take(n) if layout.detail else None
    param_sumsq = take(n) if layout.detail else None
    out_sq = take(len(layout.out_entries))
    grad_sq = take(len(layout.grad_entries))
    sat = take(2 * len(layout.saturating))
    input_sq = take(1)[0] if layout.has_input else None
    out_numel = take(len(layout.out_entries))
    grad_numel = take(len(layout.grad_entries))
    act_numel = take(len(layout.saturating))
    input_numel = take(1)[0] if layout.has_input else 0.0
    maxes = take(layout.n_max)
    bits = unpack_bits(values[pos:])
    bit_pos = 0

    def take_mask(size: int) -> int:
        """The next ``size`` bits of the packed masks, as an int (bit i = unit i)."""
        nonlocal bit_pos
        mask = (bits >> bit_pos) & ((1 << size) - 1)
        bit_pos += size
        return mask

    by_index = {layer.index: layer for layer in layers}
    # every watched module appears, measured this step or not
    stats = {
        info.index: LayerStats(
            name=info.name, kind=info.kind, depth=depth.get(info.index), fan_in=info.fan_in
        )
        for info in layers
    }

    acc: dict[int, list[float]] = {}  # sumsq, numel, nonzero, param sumsq, max, nonfinite
    max_pos = 0
    for k, slot in enumerate(slots):
        a = acc.get(slot.layer)
        if a is None:
            a = acc[slot.layer] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        a[0] += sumsq[k]
        a[1] += slot.numel
        if nonzero is not None and param_sumsq is not None:
            a[2] += nonzero[k]
            a[3] += param_sumsq[k]
            if slot.has_values:
                m = maxes[max_pos]
                max_pos += 1
                a[4] = m if (m != m or a[4] != a[4]) else max(a[4], m)
        if nonfinite_counts is not None and checked_param_sumsq is not None:
            a[5] += nonfinite_counts[k]
            a[3] += checked_param_sumsq[k]
        if slot.rows:
            ls = stats[slot.layer]
            ls.units = slot.rows
            ls.zero_grad_units = UnitMask(take_mask(slot.rows), slot.rows).complement()

    previous_layers = previous.layers if previous is not None else {}
    total_sumsq = 0.0
    total_psq = 0.0
    for index, (s2, numel, nz, psq, mx, nf) in acc.items():
        ls = stats[index]
        norm = _sqrt(s2)
        ls.grad_norm = norm
        ls.numel = int(numel)
        ls.grad_rms = norm / math.sqrt(numel) if numel else 0.0
        if nonfinite_counts is not None:
            ls.grad_nonfinite = int(nf)
        elif math.isfinite(norm):
            ls.grad_nonfinite = 0
        if layout.detail or checked_param_sumsq is not None:
            ls.param_norm = _sqrt(psq)
            ls.param_rms = ls.param_norm / math.sqrt(numel) if numel else 0.0
            total_psq += psq
        else:
            before = previous_layers.get(ls.name)
            if before is not None:
                ls.param_norm, ls.param_rms = before.param_norm, before.param_rms
        if layout.detail:
            ls.grad_zero_fraction = 1.0 - nz / numel if numel else 0.0
            ls.grad_max = mx
        total_sumsq += s2
    for index, names in layout.missing.items():
        stats[index].missing_grad = tuple(names)

    for index, (sq, count) in _per_module(layout.out_entries, out_sq, out_numel).items():
        ls = stats[index]
        ls.output_nonfinite = not math.isfinite(sq)
        ls.output_rms = _sqrt(sq / count) if count else None
    for index, (sq, count) in _per_module(layout.grad_entries, grad_sq, grad_numel).items():
        ls = stats[index]
        ls.output_grad_norm = _sqrt(sq)
        ls.output_grad_rms = ls.output_grad_norm / math.sqrt(count) if count else None
    for index, calls in layout.calls.items():
        stats[index].calls = calls
    for j, index in enumerate(layout.saturating):
        count, deriv, numel = sat[2 * j], sat[2 * j + 1], act_numel[j]
        ls = stats[index]
        ls.saturated_fraction = count / numel if numel else None
        ls.mean_derivative = deriv / numel if numel else None
    for index, units in layout.relu_units:
        stats[index].active_units = UnitMask(take_mask(units), units)
    for index, units in layout.positive_units:
        stats[index].positive_units = UnitMask(take_mask(units), units)

    ordered = sorted(
        stats.values(), key=lambda s: (s.depth is None, s.depth if s.depth is not None else 0.0)
    )
    missing_names = tuple(
        f"{by_index[i].name}.{p}" if by_index[i].name else p
        for i, names in layout.missing.items()
        for p in names
    )
    if layout.detail or checked_param_sumsq is not None:
        global_psq: float | None = _sqrt(total_psq)
    else:
        global_psq = previous.global_param_norm if previous is not None else None
    return StepStats(
        step=layout.step,
        layers={s.name: s for s in ordered},
        global_grad_norm=_sqrt(total_sumsq),
        global_param_norm=global_psq,
        missing=missing_names,
        optimizer=optimizer,
        activations_observed=bool(layout.calls),
        input_rms=_sqrt(input_sq / input_numel) if input_sq is not None and input_numel else None,
        detail=layout.detail,
    )
