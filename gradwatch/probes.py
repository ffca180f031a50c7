"""Forward hooks that measure what flows through the network at monitored steps.

Hooks exist only while a monitored step is under way (:meth:`Probes.arm` /
:meth:`Probes.disarm`), so unmonitored steps run the model untouched. They come in two
tiers, so that the common monitored step stays cheap:

- core (every monitored step), on ReLU-family and sigmoid/tanh modules only: per unit,
  the sum of the output over the batch (> 0: the unit was active at least once), and
  for sigmoid/tanh how many outputs sit where the derivative is below 1% of its
  maximum, with the sum of the derivative;
- detail (see ``detail_every``), on every watched module: its place in the forward
  order (depth), the norm of its output (forward signal) and of the gradient with
  respect to that output (backward signal, through a tensor hook), and the norm of the
  model's input as the first module saw it.

Everything stays on the tensors' device; nothing is read by the host here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from .attention import AttentionCapture
from .attention_sample import AttentionCall
from .forward_context import first_tensor, grad_enabled, in_backward, is_compiling
from .guard import Guard
from .layers import CONV, EMBEDDING, LINEAR, NORM, RECURRENT, RELU, SIGMOID, TANH, LayerInfo
from .loss_contract import LossCall, LossCheck, PostHandler, PreHandler
from .recurrent import state_tensors
from .unit_sums import PendingSums, UnitActivity, sum_dims
from .unit_sums import accumulate as _accumulate

# A sigmoid/tanh output counts as saturated where the derivative is below this share
# of its maximum (sigmoid' <= 0.25, tanh' <= 1).
SATURATION_LEVEL = 0.01
_SIGMOID_DERIV_MAX = 0.25
# A forward pass that is never followed by step() must not grow memory without bound.
_MAX_ENTRIES = 8192

_F32 = torch.float32
_Tensor = torch.Tensor
_ACTIVATION_KINDS = (RELU, SIGMOID, TANH)


def _raised(output: Any) -> bool:
    """Whether an ``always_call`` forward hook runs for a forward that raised: torch calls
    it from its exception handler, with no output (``None``) while the exception is handled."""
    return output is None and sys.exc_info()[1] is not None


_LOSS_MODULE = nn.modules.loss._Loss


def _chain_pre(first: PreHandler | None, second: PreHandler | None) -> PreHandler | None:
    """One pre-hook handler that runs ``first``, then ``second`` (either may be missing)."""
    if first is None or second is None:
        return first or second

    def both(module: nn.Module, args: Any) -> None:
        first(module, args)
        second(module, args)

    return both


def _chain_post(first: PostHandler | None, second: PostHandler | None) -> PostHandler | None:
    """One post-hook handler that runs ``first``, then ``second`` (either may be missing)."""
    if first is None or second is None:
        return first or second

    def both(module: nn.Module, args: Any, output: Any) -> None:
        first(module, args, output)
        second(module, args, output)

    return both


def _norm(values: torch.Tensor) -> torch.Tensor:
    """L2 norm accumulated in float32 (float64 stays float64: its norm cannot narrow)."""
    if values.dtype == torch.float64:
        return torch.linalg.vector_norm(values)
    return torch.linalg.vector_norm(values, dtype=_F32)


@dataclass
class ProbeRecord:
    """What the probes gathered since they were armed (device tensors, not yet read)."""

    detail: bool = False
    order: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    # (layer index, norm, number of elements), one entry per call
    out_norms: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)
    grad_norms: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)
    unit_activity: UnitActivity = field(default_factory=UnitActivity)
    #: ReLU outputs whose unit_activity sums are still to be taken (see gradwatch.unit_sums)
    pending: PendingSums = field(default_factory=PendingSums)
    # Linear/Conv outputs (pre-activations): per unit, the sum of the positive part
    positive: dict[int, torch.Tensor] = field(default_factory=dict)
    saturated: dict[int, torch.Tensor] = field(default_factory=dict)
    derivative_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    activation_numel: dict[int, int] = field(default_factory=dict)
    input_norm: torch.Tensor | None = None  # the model's input, as the first module saw it
    input_numel: int = 0
    input_seen: bool = False  # the first module measured this step looked at its input
    attention: list[AttentionCall] = field(default_factory=list)
    loss_calls: list[LossCall] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.calls and not self.attention


# Where the unit (neuron/channel) axis sits in a tensor produced by each kind of layer.
_CHANNELS_FIRST = (CONV,)
_CHANNELS_LAST = (LINEAR, EMBEDDING)


def unit_axis(ndim: int, producer: str | None, producer_channels_first: bool) -> int:
    """The axis whose entries are the units of an activation's input.

    Linear layers put units last, convolutions (and the norms that follow them) put
    channels at axis 1. Without a known producer, a 3-D tensor is read as
    (batch, sequence, features) and anything else as (batch, channels, ...).

    >>> unit_axis(3, None, False), unit_axis(3, "conv", False), unit_axis(4, "linear", False)
    (2, 1, 3)
    """
    if ndim <= 1:
        return 0
    if producer in _CHANNELS_FIRST or (producer == NORM and producer_channels_first):
        return 1
    if producer in _CHANNELS_LAST or producer == NORM:
        return ndim - 1
    return ndim - 1 if ndim == 3 else 1


def per_unit_sum(values: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum over every axis but the unit axis, in float32: one number per unit."""
    ndim = values.dim()
    if ndim == 1:
        return values.to(torch.float64 if values.dtype == torch.float64 else _F32)
    dtype = torch.float64 if values.dtype == torch.float64 else _F32
    if ndim == 2 and axis == 1:  # the common (batch, features) case, without a dims list
        return values.sum(0, dtype=dtype)
    return values.sum(dim=sum_dims(ndim, axis), dtype=dtype)


class Probes:
    """Forward hooks on the watched modules, present only while armed.

    The hooks are *global* module hooks (``torch.nn.modules.module.register_module_forward_hook``)
    that look the calling module up in a table of the watched ones. Nothing is ever stored
    on the user's modules, so a watched model can be pickled, saved whole with ``torch.save``,
    deep-copied (an EMA or SWA copy) or scripted at any step, and a copy's forward passes
    never reach the watcher: the copy's modules are not in the table.
    """

    def __init__(
        self, layers: list[LayerInfo], guard: Guard, root: nn.Module | None = None
    ) -> None:
        self._layers = [layer for layer in layers if layer.probe]
        self._guard = guard
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._off = False
        self._detail = False
        self.record = ProbeRecord()
        self._producer: str | None = None
        self._producer_channels_first = False
        self._axis: dict[int, int] = {}  # unit axis per activation, learnt on detail steps
        #: ReLUs whose units the producing layer's gradient rows already show: on steps
        #: without detail they need no hook at all.
        self.skip_core: set[int] = set()
        self._core_hooks = {
            layer.index: self._make_core_hook(layer)
            for layer in self._layers
            if layer.kind in _ACTIVATION_KINDS
        }
        # Plain ReLUs (the common case, and most of a monitored step's module calls) get
        # the core hook's work in its fewest steps.
        self._core_hooks.update(
            {
                layer.index: self._make_relu_hook(layer.index)
                for layer in self._layers
                if layer.kind == RELU and getattr(layer.module, "max_val", None) is None
            }
        )
        # (after the core hooks: a detail step's hook runs the layer's core hook too)
        self._full_hooks = {layer.index: self._make_full_hook(layer) for layer in self._layers}
        self._grad_hooks = {
            layer.index: self._make_grad_hook(layer.index) for layer in self._layers
        }
        self._order_hooks = {
            layer.index: self._make_order_hook(layer.index)
            for layer in self._layers
            if not layer.is_leaf
        }
        self._root = root
        #: a forward pass of the root module has started and not finished
        self._in_forward = False
        # id(module) -> (module, pre handler, post handler) for the current arming: the
        # probes' hooks and the loss check's, each module's made into one handler per side
        self._calls: dict[int, tuple[nn.Module, PreHandler | None, PostHandler | None]] = {}
        self._probing = False  # the probes have hooks in the current arming
        self._loss_armed = False  # the loss check looks at this arming's module calls
        #: attention softmax statistics (see gradwatch.attention), armed with the hooks
        self.attention = (
            AttentionCapture(root, {layer.name for layer in layers}, guard, lambda: self.record)
            if root is not None
            else None
        )
        #: what reaches the loss after the forward pass (see gradwatch.loss_contract)
        self.loss = LossCheck(root, guard, lambda: self.record) if root is not None else None
        if self.loss is not None:
            self.loss.on_shut_down = self._loss_off
        self._probe_calls: dict[int, tuple[nn.Module, PreHandler | None, PostHandler | None]] = {}

    @property
    def armed(self) -> bool:
        # The loss check counts too: with every ReLU covered by its layer's gradient rows
        # and no attention, its hooks are the only ones, and they must come off after the
        # monitored step like the others.
        return (
            bool(self._handles)
            or (self.attention is not None and self.attention.armed)
            or (self.loss is not None and self.loss.armed)
        )

    @property
    def armed_detail(self) -> bool:
        return self.armed and self._detail

    @property
    def active(self) -> bool:
        """False once a probe failed (then they stay off)."""
        return not self._off and bool(self._layers)

    def arm(self, detail: bool) -> None:
        """Place the hooks for the next forward pass (``detail``: every module, signals too)."""
        if self._off or (self.armed and self._detail == detail):
            return
        self.disarm()
        self._detail = detail
        self.record = ProbeRecord(detail=detail)
        post: dict[int, PostHandler] = {}
        pre: dict[int, PreHandler] = {}
        modules: dict[int, nn.Module] = {}
        for layer in self._layers:
            module = layer.module
            if detail:
                if not layer.is_leaf:
                    # Containers that own parameters (attention, a root with embeddings)
                    # start before their children: take their depth when they start.
                    pre[id(module)] = self._order_hooks[layer.index]
                post[id(module)] = self._full_hooks[layer.index]
            elif layer.index in self._core_hooks and layer.index not in self.skip_core:
                post[id(module)] = self._core_hooks[layer.index]
            else:
                continue
            modules[id(module)] = module
        self._probing = bool(post)  # (no post-hook: no pre-hook either)
        self._in_forward = False
        if self.attention is not None:
            self.attention.arm(detail)
        loss_calls = {}
        if self.loss is not None:
            self.loss.arm()
            if self.loss.armed:
                loss_calls = self.loss.module_handlers()
        self._loss_armed = bool(loss_calls)
        if self._probing and self._root is not None:
            # The root's start and end bracket a pass: they tell a forward pass an
            # exception aborted (the out-of-memory pattern: catch, skip the batch, go on)
            # from a finished one.
            key = id(self._root)
            modules[key] = self._root
            pre[key] = _chain_pre(self._root_starts, pre.get(key))
            post[key] = _chain_post(post.get(key), self._root_ends)
        # One table, one lookup per module call: the probe's handler and the loss check's
        # made into one per side (probes first, as they are the finer measurement).
        probe_calls = {key: (m, pre.get(key), post.get(key)) for key, m in modules.items()}
        calls = dict(probe_calls)
        for key, (module, before, after) in loss_calls.items():
            calls[key] = (
                module,
                _chain_pre(pre.get(key), before),
                _chain_post(post.get(key), after),
            )
        self._calls, self._probe_calls = calls, probe_calls
        # One pair of global hooks serves the probes and the loss check: each pair costs
        # every module call of the process a dispatch of its own. (Global hooks, so the
        # model's own hook tables stay untouched.) Placed after the attention capture's:
        # at the end of a pass its mode leaves the stack before the loss check's comes on.
        if calls:
            self._handles.append(register_module_forward_pre_hook(self._dispatch_pre))
            # always_call: the loss check keeps its depth right through a forward that raised
            post_hook = register_module_forward_hook(self._dispatch_post, always_call=True)
            self._handles.append(post_hook)

    def set_skip(self, indices: set[int]) -> None:
        """Change which activations go without a hook on steps without detail."""
        if indices == self.skip_core:
            return
        self.skip_core = set(indices)
        if self.armed and not self._detail:
            self.disarm()  # re-armed with the new set before the next forward pass

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls, self._probe_calls = {}, {}
        self._probing = False
        self._loss_armed = False
        if self.attention is not None:
            self.attention.disarm()
        if self.loss is not None:
            self.loss.disarm()

    def _loss_off(self) -> None:
        """The loss check switched itself off: its handlers leave this arming's table."""
        self._calls = self._probe_calls
        self._loss_armed = False

    def losses_done(self) -> None:
        """The step's losses are computed (``watcher.step()`` is called): stop checking them."""
        if self.loss is not None:
            self.loss.close_window()

    def take(self) -> ProbeRecord:
        """Hand over what was gathered and start afresh."""
        self._sum_pending()
        record, self.record = self.record, ProbeRecord(detail=self._detail)
        self._producer = None
        if self.loss is not None:
            self.loss.close_window()  # the step is over: later losses are not its own
        return record

    def shut_down(self, error: BaseException | None = None) -> None:
        self._off = True
        if self.attention is not None:
            self.attention.shut_down()
        if self.loss is not None:
            self.loss.shut_down()
        self.disarm()
        self.record = ProbeRecord()
        if error is not None:
            self._guard.fail("activation probes", error)

    # -- hooks -------------------------------------------------------------------------

    # The global hooks run for every module call of the process while armed: one
    # dictionary lookup finds the module's handler; a module that is neither probed nor
    # the model's costs that failed lookup (and a loss module outside the model is seen).
    def _dispatch_pre(self, module: nn.Module, args: Any) -> None:
        entry = self._calls.get(id(module))
        if entry is not None and entry[0] is module:
            if entry[1] is not None:
                entry[1](module, args)
        elif self._loss_armed and isinstance(module, _LOSS_MODULE):
            self.loss.foreign_before(module)  # type: ignore[union-attr]
        return None

    def _dispatch_post(self, module: nn.Module, args: Any, output: Any) -> None:
        entry = self._calls.get(id(module))
        if entry is not None and entry[0] is module:
            if entry[2] is not None:
                entry[2](module, args, output)
        elif self._loss_armed and self.loss.pushed_by is module:  # type: ignore[union-attr]
            self.loss.foreign_after(module)  # type: ignore[union-attr]
        return None

    def _root_starts(self, module: nn.Module, args: Any) -> None:
        if self._off or is_compiling() or in_backward() or not grad_enabled():
            return
        if self._in_forward:
            # The last forward pass never returned: what it left (modules counted, output
            # norms of a batch that was dropped) must not mix with this batch's. The
            # forward order stays: it is the model's own.
            self.record = ProbeRecord(detail=self._detail, order=self.record.order)
            self._producer = None
        self._in_forward = True

    def _root_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        if _raised(output):
            return  # the pass was aborted: the next one starts afresh (see _root_starts)
        self._in_forward = False
        self._sum_pending()  # the pass is over: hold no output past it

    def _sum_pending(self) -> None:
        record = self.record
        if not record.pending:
            return
        try:
            record.pending.flush(record.unit_activity)
        except Exception as error:
            self.shut_down(error)

    def _make_order_hook(self, index: int) -> Callable[..., None]:
        def order_hook(module: nn.Module, args: Any) -> None:
            if self._off or is_compiling() or in_backward():
                return None
            try:
                order = self.record.order
                if not self.record.input_seen and grad_enabled():
                    self._note_input(args)
                if index not in order:
                    order[index] = len(order)
            except Exception as error:
                self.shut_down(error)
            return None

        return order_hook

    def _make_full_hook(self, layer: LayerInfo) -> Callable[..., None]:
        index, kind = layer.index, layer.kind
        producer = kind if layer.is_leaf and layer.params else None
        # Pre-activations of Linear/Conv: which units were ever positive (a ReLU after a
        # layer whose gradient is entirely blocked shows its dead units only here).
        positive_axis = {LINEAR: -1, CONV: 1}.get(kind) if producer is not None else None
        channels_first = isinstance(
            layer.module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
        )
        core = self._core_hooks.get(index)  # the same work as on other steps
        # A recurrent layer returns its final state beside the output sequence, and a
        # classifier often reads only the state: the backward signal is what reaches either.
        recurrent = kind == RECURRENT

        def full_hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._off or is_compiling() or _raised(output):
                return None  # (probes look at passes that returned)
            try:
                record = self.record
                recomputing = in_backward()
                if not recomputing and index not in record.order:
                    # The forward order, also from a pass without gradients: reentrant
                    # activation checkpointing runs the forward under no_grad and the
                    # recomputation (in reverse block order) inside backward.
                    record.order[index] = len(record.order)
                if not grad_enabled() or (recomputing and index in record.calls):
                    return None  # no gradient will flow, or already measured this step
                tensor = first_tensor(output)
                if tensor is None or tensor.numel() == 0:
                    return None  # an empty call (an expert routed no tokens) says nothing
                if not record.input_seen and not recomputing:
                    self._note_input(args)
                if len(record.out_norms) < _MAX_ENTRIES:
                    values = tensor.detach()
                    norm = _norm(values)
                    record.out_norms.append((index, norm, values.numel()))
                    if tensor.requires_grad:
                        tensor.register_hook(self._grad_hooks[index])
                    if recurrent:
                        for state in state_tensors(output):
                            state.register_hook(self._grad_hooks[index])
                    if positive_axis is not None and values.dim() >= 2:
                        axis = positive_axis % values.dim()
                        positive = per_unit_sum(values.clamp(min=0), axis)
                        _accumulate(record.positive, index, positive)
                if core is not None:
                    self._axis[index] = unit_axis(
                        tensor.dim(), self._producer, self._producer_channels_first
                    )
                    core(module, args, output)
                else:
                    record.calls[index] = record.calls.get(index, 0) + 1
                if producer is not None:
                    self._producer = producer
                    self._producer_channels_first = channels_first
            except Exception as error:
                self.shut_down(error)
            return None

        return full_hook

    def _make_core_hook(self, layer: LayerInfo) -> Callable[..., None]:
        """The hook of a sigmoid/tanh or of a ReLU with an upper clamp (ReLU6): plain
        ReLUs have their own, :meth:`_make_relu_hook`."""
        index, kind = layer.index, layer.kind
        # ReLU6 passes gradient only strictly between 0 and its upper clamp.
        upper = getattr(layer.module, "max_val", None) if kind == RELU else None

        def core_hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._off or not grad_enabled() or is_compiling():
                return None
            try:
                record = self.record
                recomputing = in_backward()
                if recomputing and index in record.calls:
                    return None  # recomputed by activation checkpointing: counted already
                tensor = output if type(output) is _Tensor else first_tensor(output)
                if tensor is None:
                    return None
                ndim = tensor.dim()
                if ndim == 0 or tensor.numel() == 0:
                    return None  # an empty call (an expert routed no tokens) says nothing
                record.calls[index] = record.calls.get(index, 0) + 1
                if kind == RELU:
                    axis = self._axis.get(index)
                    if axis is None or axis >= ndim:
                        axis = unit_axis(ndim, None, False)
                    record.pending.flush(record.unit_activity)  # the sums stay in call order
                    values = tensor.detach()
                    # The output is in [0, upper]: the product is > 0 only strictly inside
                    # the range, where the unit passes gradient.
                    activity = values * (upper - values)
                    _accumulate(record.unit_activity, index, per_unit_sum(activity, axis))
                else:
                    self._saturation(index, kind, tensor.detach())
            except Exception as error:
                self.shut_down(error)
            return None

        return core_hook

    def _make_relu_hook(self, index: int) -> Callable[..., None]:
        """The hook of a plain ReLU (no upper clamp), on every monitored step (detail
        steps run it from the full hook): which units fired, with each tensor attribute
        read once (every read is a call into torch, and this runs for each ReLU call of
        every monitored step)."""
        axes = self._axis  # (filled in on detail steps; the same dict for good)

        def relu_hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._off or not grad_enabled() or is_compiling():
                return None
            try:
                record = self.record
                recomputing = in_backward()
                if recomputing and index in record.calls:
                    return None  # recomputed by activation checkpointing: counted already
                tensor = output if type(output) is _Tensor else first_tensor(output)
                if tensor is None:
                    return None
                shape = tensor.shape
                ndim = len(shape)
                nbytes = tensor.nbytes
                if ndim == 0 or not nbytes:
                    return None  # an empty call (an expert routed no tokens) says nothing
                calls = record.calls
                calls[index] = calls.get(index, 0) + 1
                axis = axes.get(index)
                if axis is None or axis >= ndim:
                    axis = unit_axis(ndim, None, False)
                pending = record.pending
                # (Not a recomputation inside backward: its pass is over already.)
                if not recomputing and pending.add(index, tensor, axis, shape, nbytes):
                    return None  # summed with the other small outputs after the pass
                pending.flush(record.unit_activity)  # the sums stay in call order
                # The output is >= 0, so a unit was active iff its sum is > 0.
                _accumulate(record.unit_activity, index, per_unit_sum(tensor.detach(), axis))
            except Exception as error:
                self.shut_down(error)
            return None

        return relu_hook

    def _make_grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def grad_hook(grad: torch.Tensor) -> None:
            if self._off:
                return None
            try:
                self.record.grad_norms.append((index, _norm(grad.detach()), grad.numel()))
            except Exception as error:
                self.shut_down(error)
            return None

        return grad_hook

    def _note_input(self, args: Any) -> None:
        self.record.input_seen = True
        tensor = first_tensor(args)
        if tensor is None:
            return
        self.record.input_norm = _norm(tensor.detach())
        self.record.input_numel = tensor.numel()

    def _saturation(self, index: int, kind: str, values: torch.Tensor) -> None:
        values = values.to(_F32) if values.dtype != torch.float64 else values
        if kind == SIGMOID:
            derivative = values * (1.0 - values) / _SIGMOID_DERIV_MAX
        else:
            derivative = 1.0 - values * values
        record = self.record
        saturated = torch.count_nonzero(derivative < SATURATION_LEVEL)
        _accumulate(record.saturated, index, saturated.to(_F32))
        _accumulate(record.derivative_sum, index, derivative.sum().to(_F32))
        record.activation_numel[index] = record.activation_numel.get(index, 0) + values.numel()
