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
import struct
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from . import attention_sample as _attention
from . import loss_contract as _loss
from .distributed import Reducer
from .layers import RECURRENT, UNIT_ROW_KINDS, LayerInfo
from .per_tensor import Groups, counts_and_maxima, shape_groups
from .probes import ProbeRecord
from .recurrent import split_gradients
from .stats import LayerStats, OptimizerInfo, StepStats, UnitMask
from .unit_sums import unit_masks

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
    n_extra: int = 0
    #: (module index, slot position): modules that share a parameter measured in that slot
    aliases: list[tuple[int, int]] = field(default_factory=list)
    #: a loss scaler is active: "scaled" (the gradients still carry its scale, the first
    #: extra) or "unscaled" (it has divided them already); None: no scaler
    scaler: str | None = None
    #: the watched modules when this step was measured (the set can change mid-run)
    layers: list[LayerInfo] | None = None
    #: attention calls measured (their sums follow the input norm, their largest logits
    #: the extras)
    attention: list[_attention.AttentionCall] = field(default_factory=list)
    #: some watched module is recurrent (its weight_hh / weight_ih are read apart)
    recurrent: bool = False
    #: loss calls measured (their statistics follow the attention maxima); ``loss_fixed``:
    #: sent as a fixed number of calls (several ranks)
    loss_calls: list[_loss.LossCall] = field(default_factory=list)
    loss_fixed: bool = False


def _local(grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if _DTensor is not None and isinstance(grad, _DTensor):
        return grad.to_local(), True
    return grad, False


def param_table(layers: list[LayerInfo]) -> list[tuple[int, str, torch.Tensor, int, bool]]:
    """(layer index, name, parameter, numel, rows are units) for every watched parameter.

    A parameter shared by several modules (tied weights: an embedding and an output
    layer) is listed once, under the first module that owns it: its gradient is read
    once and counted once in the global norm."""
    return param_tables(layers)[0]


def param_tables(
    layers: list[LayerInfo],
) -> tuple[list[tuple[int, str, torch.Tensor, int, bool]], list[tuple[int, torch.Tensor]]]:
    """:func:`param_table`, and the (module index, parameter) pairs it left out because
    an earlier module owns the same parameter."""
    table = []
    aliases = []
    seen: set[int] = set()
    for layer in layers:
        unit_rows = layer.kind in UNIT_ROW_KINDS
        for pname, param in layer.params:
            if id(param) in seen:
                aliases.append((layer.index, param))
                continue
            seen.add(id(param))
            rows = unit_rows and pname == "weight" and param.dim() >= 2
            table.append((layer.index, pname, param, param.numel(), rows))
    return table, aliases


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
            if param.requires_grad:  # a frozen parameter is not missing a gradient
                missing.setdefault(index, []).append(pname)
            continue
        if type(grad) is plain and grad.layout is _STRIDED:
            sharded = False
        else:
            grad, sharded = _local(grad)
            if grad.layout is not _STRIDED:
                # Sparse gradients (nn.Embedding(sparse=True)): the stored values are the
                # non-zero part, so norms, maxima and non-zero counts read them alone.
                grad = _sparse_values(grad)
                rows = False
        has_values = grad.numel() > 0
        if rows and not sharded:
            row_slots.append(
                Slot(index, pname, grad, param, numel, False, grad.shape[0], has_values)
            )
        else:
            other_slots.append(Slot(index, pname, grad, param, numel, sharded, 0, has_values))
    return row_slots + other_slots, missing


_STRIDED = torch.strided
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_GRAD = attrgetter("grad")
_LAYOUT = attrgetter("layout")
_SHAPE = attrgetter("shape")


def _sparse_values(grad: torch.Tensor) -> torch.Tensor:
    """The explicitly stored values of a sparse gradient (duplicates summed)."""
    if grad.layout is torch.sparse_coo:
        return grad.coalesce().values()
    return grad.values()  # compressed layouts (CSR, CSC, BSR, BSC) hold no duplicates


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norms accumulated in float32 (float64 tensors in float64: a norm may not narrow)."""
    if not tensors:
        return []
    if any(t.dtype == _F64 for t in tensors):
        return [_norm(t) for t in tensors]
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=_F32))
    except (TypeError, RuntimeError, AttributeError):  # older builds: no dtype argument
        return [torch.linalg.vector_norm(t, dtype=_F32) for t in tensors]


def _norm(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if t.dtype == _F64:
        return torch.linalg.vector_norm(t, dim=dim)
    if t.dtype == _F32:  # asking for a dtype it already has takes a slower path
        return torch.linalg.vector_norm(t, dim=dim)
    return torch.linalg.vector_norm(t, dim=dim, dtype=_F32)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean vector into bytes (float values 0..255, exact), bit i = element i."""
    weights = _BIT_WEIGHTS.get(mask.device)
    if weights is None:
        weights = torch.tensor([1 << i for i in range(8)], dtype=_F32)
        weights = weights.to(mask.device, non_blocking=True)
        _BIT_WEIGHTS[mask.device] = weights
    pad = (-mask.numel()) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    return mask.to(_F32).view(-1, 8) @ weights


def pack_bit_words(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean vector into float64 values whose raw bytes are its bits (bit i =
    element i, little-endian), 64 bits a value: the host turns them back into bytes with
    one ``struct.pack`` (:func:`bit_words_to_bytes`) instead of one int() per byte, which
    cost 0.2 ms a step at 400 layers. The values are bit patterns, not numbers (some are
    NaN): they are only copied (cat, transfer, tolist), never computed with.

    >>> mask = torch.tensor([True, False, True] + [False] * 60 + [True])
    >>> words = pack_bit_words(mask)
    >>> words.dtype, words.numel(), int.from_bytes(bit_words_to_bytes(words.tolist()), "little")
    (torch.float64, 1, 9223372036854775813)
    """
    pad = (-mask.numel()) % 64
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    return pack_bits(mask).to(torch.uint8).view(_F64)


def bit_words_to_bytes(words: list[float]) -> bytes:
    """The bytes :func:`pack_bit_words` packed, from the transferred values (a Python
    float keeps its IEEE bits, NaN payloads included, and struct copies them as they are)."""
    return struct.pack(f"<{len(words)}d", *words)


def _row_norms(grad: torch.Tensor) -> torch.Tensor:
    return _norm(grad.flatten(1), dim=1)


#: Tensors up to this many values are read together with others of their kind: for them
#: the cost of an operation is its overhead, not the data.
_SMALL = 1 << 14


#: (positions of the small 1-D tensors, their sizes, positions of the others)
_SmallSplit = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def small_split(grads: list[torch.Tensor]) -> _SmallSplit | None:
    """Which tensors :meth:`Collector._squared_norms` sums over one concatenation (small
    1-D tensors of the first one's dtype); None when fewer than 8 are."""
    small = tuple(
        k
        for k, g in enumerate(grads)
        if g.dim() == 1 and 0 < g.numel() <= _SMALL and g.dtype == grads[0].dtype
    )
    if len(small) < 8:
        return None
    chosen = set(small)
    rest = tuple(k for k in range(len(grads)) if k not in chosen)
    return small, tuple(grads[k].numel() for k in small), rest


def _row_runs(grads: list[torch.Tensor]) -> list[tuple[int, int, bool]]:
    """Runs of weight gradients whose row norms are read in one operation: small
    matrices with the same row length and dtype, concatenated. (start, stop, all 2-D)."""
    runs: list[tuple[int, int, bool]] = []
    start = None
    for k, grad in enumerate(grads):
        if grad.numel() > _SMALL or grad.dim() < 2:
            if start is not None:
                runs.append((start, k, False))
                start = None
            runs.append((k, k + 1, False))
            continue
        if start is not None and (
            grads[start].dtype != grad.dtype or grads[start].shape[1:] != grad.shape[1:]
        ):
            runs.append((start, k, False))
            start = None
        if start is None:
            start = k
    if start is not None:
        runs.append((start, len(grads), False))
    # Same-width matrices concatenate along rows as they are, without a flatten each.
    return [
        (a, b, b - a > 1 and all(g.dim() == 2 for g in grads[a:b])) for a, b, _ in runs
    ]


def _row_norms_of(
    grads: list[torch.Tensor], runs: list[tuple[int, int, bool]] | None = None
) -> list[torch.Tensor]:
    """Row norms of each weight gradient, in order. Runs of small matrices with the same
    row length and dtype are concatenated and read in one operation."""
    out: list[torch.Tensor] = []
    for start, stop, plain in runs if runs is not None else _row_runs(grads):
        if stop - start == 1:
            out.append(_row_norms(grads[start]))
        elif plain:
            out.append(_norm(torch.cat(grads[start:stop]), dim=1))
        else:
            out.append(_norm(torch.cat([g.flatten(1) for g in grads[start:stop]]), dim=1))
    return out


def _set_flags(parts: list[torch.Tensor], device: torch.device, world: int) -> torch.Tensor:
    """The masks as one vector whose entries > 0 are the set bits. Each part is compared
    on its own (no conversion of each to a common dtype); across ranks the flags are
    summed, so there they travel as numbers."""
    if not parts:
        return torch.zeros(0, device=device)
    # Consecutive parts of one dtype and device: one comparison. (Hundreds of parts in a
    # deep model: their kinds are read in C, and runs are cut only where a kind changes.)
    kinds = list(zip(map(_DTYPE, parts), map(_DEVICE, parts)))
    cuts = [k for k in range(1, len(parts)) if kinds[k] != kinds[k - 1]]
    groups = [parts[a:b] for a, b in zip([0, *cuts], [*cuts, len(parts)])]
    flags = [(torch.cat(g) if len(g) > 1 else g[0]) > 0 for g in groups]
    flags = torch.cat([f if f.device == device else f.to(device) for f in flags])
    return flags.to(_F64) if world > 1 else flags


def _param_sumsq(slots: list[Slot], device: torch.device) -> torch.Tensor:
    """Squared norm of each slot's parameter (its local shard under FSDP2), float64."""
    with torch.no_grad():  # outside autograd: cheaper than a detach() of each parameter
        params = [_local(s.param)[0] for s in slots]
        return _stack(_norms(params), device).to(_F64).square()


def _stack(scalars: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if any(t.device != device or t.dtype != _F32 for t in scalars):
        # float64 models give float64 norms; everything travels as float64 anyway
        dtype = _F64 if any(t.dtype == _F64 for t in scalars) else _F32
        scalars = [t.to(device=device, dtype=dtype) for t in scalars]
    return torch.stack(scalars)


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if any(p.device != device or p.dtype != parts[0].dtype for p in parts):
        dtype = _F64 if any(p.dtype == _F64 for p in parts) else _F32
        parts = [p.to(device=device, dtype=dtype) for p in parts]
    return torch.cat(parts)


def _vector(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate float32 pieces (moving any that sit elsewhere) into one float64 vector."""
    if not parts:
        return torch.zeros(0, dtype=_F64, device=device)
    return _cat(parts, device).to(_F64)


@dataclass
class _SlotPlan:
    """How to read the gradients of a step whose parameters with a gradient, and the types
    of those gradients, are those of the step it was built for."""

    types: list[type]  # type of each watched parameter's .grad (NoneType where absent)
    shapes: list[torch.Size]  # of each slot's gradient
    order: list[int]  # table position of each slot's parameter
    slots: list[Slot]
    missing: dict[int, list[str]]
    rows: tuple[int, ...]  # rows of each unit-row slot (they come first)
    runs: list[tuple[int, int, bool]]  # row-norm runs: (start, stop, concatenate as 2-D)
    aliases: list[tuple[int, int]]
    reusable: bool
    split: _SmallSplit | None  # how the other slots' norms are batched
    #: how detail steps batch the per-tensor counts and maxima (worked out at the first)
    detail_groups: Groups | None = None

    @property
    def row_slots(self) -> int:
        return len(self.rows)

    @classmethod
    def build(
        cls,
        slots: list[Slot],
        missing: dict[int, list[str]],
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        types: list[type],
        aliases: list[tuple[int, torch.Tensor]],
    ) -> _SlotPlan:
        position = {id(p): k for k, p in enumerate(params)}
        rows = tuple(s.rows for s in slots if s.rows)
        reusable = all(
            type(g) is torch.Tensor and g.layout is _STRIDED and not s.sharded
            for s, g in zip(slots, grads)
        )
        at = {id(slot.param): k for k, slot in enumerate(slots)}
        return cls(
            types=types,
            shapes=[g.shape for g in grads],
            order=[position[id(s.param)] for s in slots],
            slots=slots,
            missing=missing,
            rows=rows,
            runs=_row_runs(grads[: len(rows)]),
            aliases=[(index, at[id(p)]) for index, p in aliases if id(p) in at],
            reusable=reusable,
            split=small_split(grads[len(rows) :]) if len(rows) < len(grads) else None,
        )


class Collector:
    """Computes the statistics of a monitored step on the gradients' device."""

    def __init__(self, layers: list[LayerInfo], reducer: Reducer) -> None:
        self.layers = layers
        self.table, self.aliases = param_tables([layer for layer in layers if layer.params])
        self.reducer = reducer
        self._segment_cache: dict[tuple, torch.Tensor] = {}
        self.recurrent = any(layer.kind == RECURRENT for layer in layers)
        self._params = [param for _, _, param, _, _ in self.table]
        self._plan: _SlotPlan | None = None

    def measure(
        self,
        step: int,
        record: ProbeRecord,
        *,
        detail: bool,
        extras: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Layout] | None:
        """Reduce this step's gradients and probe record into one float64 vector.

        ``extras`` are scalars that travel along unchanged (the loss scale of a
        GradScaler: equal on every rank, so they are combined with the maxima)."""
        found = self._gradients()
        if found is None:
            return None
        plan, grads = found
        slots, missing = plan.slots, plan.missing
        home = grads[0].device
        world = self.reducer.world_size
        sums: list[torch.Tensor] = []  # 1-D pieces, summed across ranks
        masks: list[torch.Tensor] = []  # > 0 means "set"; summed across ranks

        n_rows = plan.row_slots
        if n_rows:
            row_norms = _cat(_row_norms_of(grads[:n_rows], plan.runs), home).to(_F64)
            energy = row_norms * row_norms  # squared in float64: tiny norms do not underflow
            segments = self._segments(plan.rows, home)
            per_tensor = torch.zeros(n_rows, dtype=energy.dtype, device=home)
            sums.append(per_tensor.index_add_(0, segments, energy))
            masks.append(energy)
        if n_rows < len(grads):
            sums.append(self._squared_norms(grads[n_rows:], home, plan.split))

        maxima = None
        with_values = [k for k, s in enumerate(slots) if s.has_values] if detail else []
        if detail:
            if plan.detail_groups is None:
                plan.detail_groups = shape_groups(grads)
            counts, largest = counts_and_maxima(grads, plan.detail_groups, home)
            sums.append(counts)
            sums.append(_param_sumsq(slots, home))
            if len(with_values) == len(grads):
                maxima = largest
            elif with_values:  # empty gradients (a sparse one without values) have none
                maxima = largest[torch.tensor(with_values).to(home, non_blocking=True)]

        n_scaled = len(slots) * (3 if detail else 1)
        if record.out_norms:
            sums.append(_stack([n for _, n, _ in record.out_norms], home).to(_F64).square())
        if record.grad_norms:
            sums.append(_stack([n for _, n, _ in record.grad_norms], home).to(_F64).square())
        saturating = sorted(record.saturated)
        if saturating:
            pairs = [t for i in saturating for t in (record.saturated[i], record.derivative_sum[i])]
            sums.append(_stack(pairs, home))
        has_input = record.input_norm is not None
        if record.input_norm is not None:
            sums.append(record.input_norm.to(device=home, dtype=_F64).square().reshape(1))
        attention_sums, attention_max, attention = _attention.pack(
            [call for call in record.attention if call.confirmed]
        )
        sums.extend(attention_sums)
        relu_units, relu_masks = unit_masks(record.unit_activity)
        masks.extend(relu_masks)
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
            summed = summed * torch.tensor(scale, dtype=_F64).to(home, non_blocking=True)
        # built on the host and sent without blocking: a plain copy to the GPU would wait
        count_vec = torch.tensor(counts, dtype=_F64).to(home, non_blocking=True)
        mask_vec = _set_flags(masks, home, world)
        max_parts = [maxima.to(_F64)] if maxima is not None else []
        max_parts += [e.detach().reshape(1).to(device=home, dtype=_F64) for e in extras or []]
        max_parts += [m.to(device=home, dtype=_F64) for m in attention_max]
        loss_fixed = world > 1
        loss_calls = list(record.loss_calls)
        max_parts += [p.to(device=home, dtype=_F64) for p in _loss.pack(loss_calls, loss_fixed)]
        max_vec = torch.cat(max_parts) if max_parts else torch.zeros(0, dtype=_F64, device=home)
        summed, count_vec, mask_vec, max_vec = self.reducer.reduce(
            summed, count_vec, mask_vec, max_vec
        )
        packed = torch.cat([summed, count_vec, max_vec, pack_bit_words(mask_vec > 0)])
        del grads  # a vector still in flight (deferred) must not keep gradients alive
        layout = Layout(
            step=step,
            slots=slots,
            missing=dict(missing),
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
            n_extra=len(extras or []),
            layers=self.layers,
            aliases=plan.aliases,
            attention=attention,
            recurrent=self.recurrent,
            loss_calls=loss_calls,
            loss_fixed=loss_fixed,
        )
        return packed, layout

    def _gradients(self) -> tuple[_SlotPlan, list[torch.Tensor]] | None:
        """This step's gradients in slot order, with the plan that reads them.

        The plan (slot objects, their order, the runs of row norms) depends only on which
        parameters have a gradient and of what type, so it is built once and reused while
        those stay the same: a step costs a pass over ``.grad`` and no per-slot objects."""
        # (attributes read with attrgetter and map: in C, once per parameter per step)
        grads = list(map(_GRAD, self._params))
        types = list(map(type, grads))
        plan = self._plan
        if plan is not None and types == plan.types:
            ordered = list(map(grads.__getitem__, plan.order))
            layouts = list(map(_LAYOUT, ordered))
            # shapes too: ``param.data = ...`` can resize a parameter without a trace
            if layouts.count(_STRIDED) == len(ordered) and plan.shapes == list(
                map(_SHAPE, ordered)
            ):
                return plan, ordered
        slots, missing = gather_slots(self.table)
        if not slots:
            self._plan = None
            return None
        ordered = [s.grad for s in slots]  # type: ignore[misc]
        for slot in slots:
            slot.grad = None  # the plan outlives this step: it holds no gradient
        plan = _SlotPlan.build(slots, missing, ordered, self._params, types, self.aliases)
        # Only plain, strided gradients (the usual case) are read through a kept plan;
        # sparse and DTensor ones are gathered afresh at every step.
        self._plan = plan if plan.reusable else None
        return plan, ordered

    def _squared_norms(
        self,
        grads: list[torch.Tensor],
        home: torch.device,
        split: _SmallSplit | bool | None = False,
    ) -> torch.Tensor:
        """Squared norm of each tensor, float64. Small 1-D tensors of one dtype (biases,
        norm scales: hundreds in a deep model) are summed in one pass over their
        concatenation: one operation instead of one per tensor. ``split`` is
        :func:`small_split` of ``grads`` when the caller keeps it from step to step."""
        if split is False:
            split = small_split(grads)
        if split is None:
            return _stack(_norms(grads), home).to(_F64).square()
        small, sizes, rest = split
        out = torch.zeros(len(grads), dtype=_F64, device=home)
        values = torch.cat([grads[k] for k in small]).to(_F64)
        out.index_add_(0, self._owner_index(small, sizes, home), values * values)
        if rest:
            norms = _stack(_norms([grads[k] for k in rest]), home).to(_F64)
            out.index_copy_(0, self._index(rest, home), norms * norms)
        return out

    def _owner_index(
        self, small: tuple[int, ...], sizes: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """For each value of the concatenated small tensors, the position of its tensor."""
        key = ("owner", small, sizes, str(device))
        cached = self._segment_cache.get(key)
        if cached is None:
            cached = self._index(small, device)[self._segments(sizes, device)]
            self._segment_cache[key] = cached
        return cached

    def _index(self, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = ("index", positions, str(device))
        cached = self._segment_cache.get(key)
        if cached is None:
            cached = torch.tensor(positions).to(device, non_blocking=True)
            self._segment_cache[key] = cached
        return cached

    def _segments(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = ("segments", rows, str(device))
        cached = self._segment_cache.get(key)
        if cached is None:
            counts = torch.tensor(rows).to(device, non_blocking=True)
            cached = torch.repeat_interleave(
                torch.arange(len(rows), device=device), counts, output_size=sum(rows)
            )
            if len(self._segment_cache) > 32:
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
        grads = [g if g.layout is _STRIDED else _sparse_values(g) for g in grads]
        counts = torch.stack([(~torch.isfinite(g)).sum().to(_F64) for g in grads])
        values = torch.cat([counts, _param_sumsq(slots, counts.device).to(_F64)]).tolist()
        return [int(v) for v in values[: len(slots)]], values[len(slots) :]


def _add(a: list[float], values: list[float]) -> None:
    """Add one parameter's numbers to its module's: sums, except the maximum (NaN wins)."""
    a[0] += values[0]
    a[1] += values[1]
    a[2] += values[2]
    a[3] += values[3]
    a[5] += values[5]
    m = values[4]
    a[4] = m if (m != m or a[4] != a[4]) else max(a[4], m)


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


#: Masks already handed out, by (bits, units); a bounded number of them.
_MASKS: dict[tuple[int, int], UnitMask] = {}
_MASKS_KEPT = 4096


def shared_mask(bits: int, size: int) -> UnitMask:
    """``UnitMask(bits, size)``, shared with earlier steps that had the same mask.

    Masks repeat from step to step (a healthy layer: every unit active, no zero gradient
    row). Each step's statistics stay in the history, and every object they hold is one
    more for each garbage collection to walk: an immutable mask shared by the steps costs
    that once. Looking it up is also cheaper than making a new one.

    >>> shared_mask(0b101, 3) is shared_mask(0b101, 3), shared_mask(0b101, 3).indices()
    (True, [0, 2])
    """
    key = (bits, size)
    mask = _MASKS.get(key)
    if mask is None:
        if len(_MASKS) >= _MASKS_KEPT:
            _MASKS.clear()  # masks that do not repeat (layers in flux): start afresh
        mask = _MASKS[key] = UnitMask(bits, size)
    return mask


_NEVER_RAN = math.inf  # sorts after every measured depth (positions are finite)


def _by_depth(layers: list[LayerInfo], depth: dict[int, float]) -> list[LayerInfo]:
    """``layers`` in forward order, modules that never ran last in registration order (as
    :meth:`StepStats.by_depth` orders them; a stable sort keeps equal keys in order)."""
    keys = [depth.get(info.index, _NEVER_RAN) for info in layers]
    # Usually the forward order is the registration order already: checking that is one
    # sort of floats in C, cheaper than a sort that calls a key function per layer.
    if keys == sorted(keys):
        return layers
    return [layers[k] for k in sorted(range(len(layers)), key=keys.__getitem__)]


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
    attention_sums = take(_attention.summed_length(layout.attention))
    out_numel = take(len(layout.out_entries))
    grad_numel = take(len(layout.grad_entries))
    act_numel = take(len(layout.saturating))
    input_numel = take(1)[0] if layout.has_input else 0.0
    maxes = take(layout.n_max)
    extras = take(layout.n_extra)
    attention_max = take(len(layout.attention))
    loss_values = take(_loss.packed_length(layout.loss_calls, layout.loss_fixed))
    packed_masks = bit_words_to_bytes(values[pos:])
    bit_pos = 0
    if layout.layers is not None:
        layers = layout.layers
    # Under a loss scaler, gradients computed from the scaled loss are scale x too large:
    # the backward signals always, parameter gradients until the scaler unscales them.
    loss_scale = extras[0] if layout.scaler is not None and extras else None
    signal_div = 1.0
    grad_div = 1.0
    if loss_scale is not None and math.isfinite(loss_scale) and loss_scale > 0:
        signal_div = loss_scale
        grad_div = 1.0 if layout.scaler == "unscaled" else loss_scale
    if grad_div != 1.0:
        sumsq = [v / (grad_div * grad_div) for v in sumsq]
        maxes = [v / grad_div for v in maxes]
    if signal_div != 1.0:
        grad_sq = [v / (signal_div * signal_div) for v in grad_sq]

    def take_mask(size: int) -> int:
        """The next ``size`` bits of the packed masks, as an int (bit i = unit i). Only
        the bytes that hold them are read: shifting one int of all masks instead would
        cost time quadratic in the number of layers."""
        nonlocal bit_pos
        start = bit_pos >> 3
        chunk = int.from_bytes(packed_masks[start : (bit_pos + size + 7) >> 3], "little")
        mask = (chunk >> (bit_pos & 7)) & ((1 << size) - 1)
        bit_pos += size
        return mask

    by_index = {layer.index: layer for layer in layers}
    # every watched module appears, measured this step or not, in forward order
    stats: dict[int, LayerStats] = {}
    named: dict[str, LayerStats] = {}
    get_depth = depth.get
    for info in _by_depth(layers, depth):
        # name, kind and depth by position: keywords cost more than the rest of the step
        ls = LayerStats(info.name, info.kind, get_depth(info.index))
        if info.fan_in is not None:
            ls.fan_in = info.fan_in
        stats[info.index] = named[info.name] = ls

    acc: dict[int, list[float]] = {}  # sumsq, numel, nonzero, param sumsq, max, nonfinite
    detailed = nonzero is not None and param_sumsq is not None
    checked = nonfinite_counts is not None and checked_param_sumsq is not None
    if not detailed and not checked:
        # The usual step: gradient norms only (same sums, in the same order, as below).
        for slot, square in zip(slots, sumsq):
            mine = acc.get(slot.layer)
            if mine is None:
                acc[slot.layer] = [square, float(slot.numel), 0.0, 0.0, 0.0, 0.0]
            else:
                mine[0] += square
                mine[1] += slot.numel
            size = slot.rows
            if size:
                ls = stats[slot.layer]
                ls.units = size
                ls.zero_grad_units = shared_mask(take_mask(size) ^ ((1 << size) - 1), size)
        per_slot = [
            [sumsq[k], float(slots[k].numel), 0.0, 0.0, 0.0, 0.0] for _, k in layout.aliases
        ]
        aliases = [(index, j) for j, (index, _) in enumerate(layout.aliases)]
        total_sumsq = sum(sumsq)
        total_psq = 0.0
    else:
        per_slot = []
        max_pos = 0
        for k, slot in enumerate(slots):
            a = [sumsq[k], float(slot.numel), 0.0, 0.0, 0.0, 0.0]
            if detailed:
                a[2] = nonzero[k]  # type: ignore[index]
                a[3] = param_sumsq[k]  # type: ignore[index]
                if slot.has_values:
                    a[4] = maxes[max_pos]
                    max_pos += 1
            if checked:
                a[5] = nonfinite_counts[k]  # type: ignore[index]
                a[3] += checked_param_sumsq[k]  # type: ignore[index]
            per_slot.append(a)
            mine = acc.get(slot.layer)
            if mine is None:
                acc[slot.layer] = list(a)
            else:
                _add(mine, a)
            if slot.rows:
                ls = stats[slot.layer]
                ls.units = slot.rows
                size = slot.rows
                ls.zero_grad_units = shared_mask(take_mask(size) ^ ((1 << size) - 1), size)
        total_sumsq = sum(a[0] for a in per_slot)
        total_psq = sum(a[3] for a in per_slot)
        aliases = layout.aliases
    # A tied parameter shows in every module that owns it, counted once in the totals.
    for index, k in aliases:
        if index in stats:
            mine = acc.get(index)
            if mine is None:
                acc[index] = list(per_slot[k])
            else:
                _add(mine, per_slot[k])

    previous_layers = previous.layers if previous is not None else {}
    finite = True  # every gradient norm finite: rules.base.gradients_finite, known here
    # (what is the same for every layer, decided once: this loop runs once per layer)
    counted = nonfinite_counts is not None
    params_read = layout.detail or checked_param_sumsq is not None
    for index, (s2, numel, nz, psq, mx, nf) in acc.items():
        ls = stats[index]
        norm = _sqrt(s2)
        finite = finite and math.isfinite(norm)
        ls.grad_norm = norm
        ls.numel = int(numel)
        ls.grad_rms = norm / math.sqrt(numel) if numel else 0.0
        if counted:
            ls.grad_nonfinite = int(nf)
        elif math.isfinite(norm):
            ls.grad_nonfinite = 0
        if params_read:
            ls.param_norm = _sqrt(psq)
            ls.param_rms = ls.param_norm / math.sqrt(numel) if numel else 0.0
        else:
            before = previous_layers.get(ls.name)
            if before is not None:
                ls.param_norm, ls.param_rms = before.param_norm, before.param_rms
        if layout.detail:
            ls.grad_zero_fraction = 1.0 - nz / numel if numel else 0.0
            ls.grad_max = mx
    if layout.recurrent:
        split_gradients(slots, sumsq, {i: by_index[i].kind for i in by_index}, stats)
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
        stats[index].active_units = shared_mask(take_mask(units), units)
    for index, units in layout.positive_units:
        stats[index].positive_units = shared_mask(take_mask(units), units)

    missing_names = tuple(
        f"{by_index[i].name}.{p}" if by_index[i].name else p
        for i, names in layout.missing.items()
        for p in names
    )
    if layout.detail or checked_param_sumsq is not None:
        global_psq: float | None = _sqrt(total_psq)
    else:
        global_psq = previous.global_param_norm if previous is not None else None
    step_stats = StepStats(
        step=layout.step,
        layers=named,
        global_grad_norm=_sqrt(total_sumsq),
        global_param_norm=global_psq,
        missing=missing_names,
        optimizer=optimizer,
        activations_observed=bool(layout.calls),
        input_rms=_sqrt(input_sq / input_numel) if input_sq is not None and input_numel else None,
        detail=layout.detail,
        loss_scale=loss_scale,
        attention=_attention.read_back(layout.attention, attention_sums, attention_max),
        loss_inputs=_loss.read_back(layout.loss_calls, loss_values),
    )
    # ``named`` is in forward order already (the order StepStats.by_depth sorts into):
    # handed over, it spares the rules a sort of every layer at every step.
    step_stats.__dict__["_ordered"] = list(named.values())
    # Several rules ask whether every gradient is finite: answered from the norms just read.
    step_stats.__dict__["_gradients_finite"] = finite
    return step_stats
