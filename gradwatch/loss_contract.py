"""The loss contract: what reaches the common losses at monitored steps.

``F.cross_entropy`` expects logits, ``F.nll_loss`` log-probabilities,
``F.binary_cross_entropy`` probabilities and ``F.binary_cross_entropy_with_logits``
logits (their ``nn.*Loss`` modules call them). A model that hands a loss the wrong kind
of tensor trains badly without any error: a softmax before ``cross_entropy`` squashes the
gradient, a sigmoid before a with-logits loss caps every prediction at >= 0.5, raw
logits into ``nll_loss`` make the loss unbounded below, a ReLU after the last layer pins
whole classes at 0, and a sigmoid saturated at exactly 0.0/1.0 the wrong way feeds
``binary_cross_entropy`` a loss of 100 with no gradient at all.

The loss is usually computed after the model's forward returns, outside its modules. So a
``TorchFunctionMode`` goes on the stack when the model's outermost module returns from a
training forward pass (gradients on, not traced by torch.compile, not recomputed inside
backward) of a monitored step. It stops looking when the backward pass starts (which it
runs with itself off, so nothing of the backward pass goes through it) and comes off the
stack at ``watcher.step()`` or the next forward pass of the model, whichever is first.
While a loss module (``nn.CrossEntropyLoss``, ...) runs inside the model's forward, the
mode is on too. What decides this runs in the probes' global module hooks (see
:class:`gradwatch.probes.Probes`), which exist only ahead of monitored steps; other steps
never see them.

Each loss call whose input needs a gradient (a teacher's output, or a metric under
``no_grad``, trains nothing and is not judged) gets a few statistics, computed on the
input's device on a strided sample of at most a few thousand rows and carried in the
monitored step's single transfer. The module whose output reached the loss is found by
tensor identity (the innermost module that returned it), and the operation that made it
from the input's autograd node (softmax, sigmoid, relu, ...).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import (
    TorchFunctionMode,
    _get_current_function_mode_stack,
    _pop_mode,
    _push_mode,
)

from .forward_context import first_tensor, grad_enabled, in_backward, is_compiling
from .guard import Guard
from .loss_input import CLASS_LOSSES, VALUES, LossInput

_F32 = torch.float32
_Tensor = torch.Tensor
_LOSSES: dict[Any, str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
}
_LOSS_MODULE = nn.modules.loss._Loss
PreHandler = Callable[[nn.Module, Any], None]
PostHandler = Callable[[nn.Module, Any, Any], None]
# The backward pass: run inside the mode's handler, where the mode is off (nothing of the
# backward pass goes through it), and the losses of the step are complete after it.
_BACKWARD = frozenset({torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad})
#: Loss calls measured per monitored step (a model with many heads: the first ones).
MAX_CALLS = 8
#: Rows (class losses) / values (binary losses) checked per call: a strided sample beyond.
#: (A large vocabulary gets fewer rows: at most MAX_VALUES values in all, at least 8 rows.)
MAX_ROWS = 2048
MAX_VALUES = 1 << 20
#: How far a row sum (probabilities) or a row's log-sum-exp (log-probabilities) may be
#: from 1 / 0: loose enough for bf16 softmax outputs, far tighter than logits ever land.
TOLERANCE = 0.02

# Autograd nodes that only move or copy values: the operation before them made the tensor.
_PASSING = frozenset(
    {
        "View",
        "UnsafeView",
        "ReshapeAlias",
        "ToCopy",
        "Clone",
        "Squeeze",
        "Unsqueeze",
        "Permute",
        "Transpose",
        "T",
        "Expand",
        "Alias",
        "Slice",
        "Select",
        "Contiguous",
    }
)
_OPERATIONS = {
    "Softmax": "softmax",
    "LogSoftmax": "log_softmax",
    "Sigmoid": "sigmoid",
    "Relu": "relu",
    "Threshold": "relu",
    "ClampMin": "clamp",
    "Clamp": "clamp",
    "Hardtanh": "hardtanh",
    "Hardsigmoid": "hardsigmoid",
    "Softplus": "softplus",
    "Exp": "exp",
    "Abs": "abs",
    "Log": "log",
}


def made_by(tensor: torch.Tensor) -> str:
    """The operation that made ``tensor`` (through views and copies), from its autograd
    node: ``"softmax"``, ``"sigmoid"``, ``"relu"``, ... or ``""``.

    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> made_by(torch.softmax(x, 1).view(3, 2)), made_by(x * 2)
    ('softmax', '')
    """
    node = tensor.grad_fn
    for _ in range(8):
        if node is None:
            return ""
        name = type(node).__name__.removesuffix("Backward").rstrip("0123456789")
        name = name.removesuffix("Backward")
        if name not in _PASSING:
            return _OPERATIONS.get(name, "")
        following = node.next_functions
        node = following[0][0] if following else None
    return ""


def _strided(values: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` entries of the first axis, spread evenly (a view, no copy)."""
    count = values.shape[0]
    if count <= limit:
        return values
    return values[:: math.ceil(count / limit)]


def class_statistics(x: torch.Tensor) -> torch.Tensor:
    """The :data:`~gradwatch.loss_input.VALUES` of an input to a loss over a class axis
    (axis 1, or 0 for one unbatched sample), from a strided sample of its rows.

    >>> rows = torch.softmax(torch.randn(6, 4), 1)
    >>> [round(v, 2) for v in class_statistics(rows).tolist()]
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    """
    classes = x.shape[0 if x.dim() == 1 else 1]
    limit = max(8, min(MAX_ROWS, MAX_VALUES // classes))
    values = x.detach()
    if values.dim() == 1:
        rows = values.reshape(1, -1)
    elif values.dim() == 2:
        rows = _strided(values, limit)
    else:  # (N, C, d1, ...): sample positions before the copy that brings classes last
        positions = values.flatten(2)
        per_sample = max(1, limit // positions.shape[0])
        positions = positions[..., :: math.ceil(positions.shape[2] / per_sample)]
        rows = _strided(positions.transpose(1, 2).reshape(-1, classes), limit)
    if rows.dtype != torch.float64:
        rows = rows.to(_F32)
    # Row minima and maxima, not elementwise comparisons reduced with .all(): the same
    # answers (a NaN makes both false) from two fast reductions instead of four passes
    # over a boolean copy of the sample (a 2,048-class vocabulary: ~2 ms on one CPU core).
    non_negative = rows.amin(-1) >= 0
    sums = rows.sum(-1)
    probability = non_negative & ((sums - 1).abs() <= TOLERANCE)
    spread = torch.logsumexp(rows, -1)
    # <= 0 with exp summing to at most 1: log-probabilities (a masked row, log_softmax plus
    # -inf on some classes, sums to less)
    log_probability = (spread <= TOLERANCE) & (rows.amax(-1) <= TOLERANCE)
    zero = sums.new_zeros(())
    return torch.stack(
        [
            probability.to(sums.dtype).mean(),
            log_probability.to(sums.dtype).mean(),
            zero,
            zero,
            zero,
            non_negative.all().to(sums.dtype),
            _dead_columns(rows).to(sums.dtype),
            _zero_share(rows),
        ]
    )


def _dead_columns(rows: torch.Tensor) -> torch.Tensor:
    """Columns of a 2-D tensor that are exactly 0 in every row (a column with a NaN is
    not): the largest and the smallest value of the column are both 0."""
    return ((rows.amax(0) == 0) & (rows.amin(0) == 0)).sum()


def _zero_share(values: torch.Tensor) -> torch.Tensor:
    """The share of values exactly 0, in ``values``' dtype (count_nonzero: one pass, no
    boolean copy; the count is exact, so the share equals the mean of ``values == 0``)."""
    zeros = values.numel() - torch.count_nonzero(values)
    return zeros.to(values.dtype) / values.numel()


def binary_statistics(x: torch.Tensor, target: Any) -> torch.Tensor:
    """The :data:`~gradwatch.loss_input.VALUES` of an input to a binary loss; columns are
    the last axis (one per label of a multilabel model).

    >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.5]])
    >>> [round(v, 2) for v in binary_statistics(x, torch.tensor([[0.0, 0.0], [1.0, 1.0]])).tolist()]
    [0.0, 0.0, 1.0, 0.75, 0.25, 1.0, 0.0, 0.25]
    """
    width = x.shape[-1] if x.dim() >= 2 else 1
    limit = max(1, MAX_VALUES // max(1, width))
    columns = _strided(x.detach().reshape(-1, width), limit)
    if columns.dtype != torch.float64:
        columns = columns.to(_F32)
    inside = ((columns >= 0) & (columns <= 1)).to(columns.dtype).mean()
    extreme = (columns == 0) | (columns == 1)
    wrong = columns.new_zeros(())
    if isinstance(target, torch.Tensor) and target.shape == x.shape:
        aims = _strided(target.detach().reshape(-1, width), limit).to(columns.dtype)
        wrong = (extreme & ((columns - aims).abs() > 0.5)).to(columns.dtype).mean()
    zero = columns.new_zeros(())
    return torch.stack(
        [
            zero,
            zero,
            inside,
            extreme.to(columns.dtype).mean(),
            wrong,
            (columns.amin() >= 0).to(columns.dtype),
            _dead_columns(columns).to(columns.dtype),
            _zero_share(columns),
        ]
    )


@dataclass
class LossCall:
    """One loss call seen during a monitored step (device statistics, not yet read)."""

    function: str
    producer: str | None
    last_layer: str | None
    via: str
    classes: int
    rows: int
    values: torch.Tensor | None  # len(VALUES) numbers on the input's device


def pack(calls: list[LossCall], fixed: bool) -> list[torch.Tensor]:
    """The calls' statistics as pieces of the step's vector (``fixed``: always
    :data:`MAX_CALLS` calls' worth, so that every rank sends a vector of one length)."""
    pieces = [call.values.reshape(-1) for call in calls if call.values is not None]
    for call in calls:  # statistics in flight (deferred on CUDA) hold no device tensors
        call.values = None
    if fixed:
        missing = (MAX_CALLS - len(pieces)) * len(VALUES)
        if missing:
            device = pieces[0].device if pieces else None
            pieces.append(torch.zeros(missing, dtype=torch.float64, device=device))
    return pieces


def packed_length(calls: list[LossCall], fixed: bool) -> int:
    return len(VALUES) * (MAX_CALLS if fixed else len(calls))


def read_back(calls: list[LossCall], values: list[float]) -> list[LossInput]:
    """Host-side records of the calls (``values``: their statistics, in order)."""
    width = len(VALUES)
    out = []
    for position, call in enumerate(calls):
        numbers = values[width * position : width * (position + 1)]
        if len(numbers) < width:
            break
        named = dict(zip(VALUES, numbers))
        out.append(
            LossInput(
                function=call.function,
                producer=call.producer,
                last_layer=call.last_layer,
                via=call.via,
                classes=call.classes,
                rows=call.rows,
                probability_rows=named["probability_rows"],
                log_probability_rows=named["log_probability_rows"],
                unit_interval=named["unit_interval"],
                saturated=named["saturated"],
                wrong_saturated=named["wrong_saturated"],
                non_negative=named["non_negative"],
                dead_columns=int(named["dead_columns"]),
                zeros=named["zeros"],
            )
        )
    return out


class _Mode(TorchFunctionMode):
    """Sees every torch function call while on the stack; hands the losses to the check."""

    def __init__(self, check: LossCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs) if kwargs else func(*args)
        try:
            name = _LOSSES.get(func)
        except TypeError:  # an unhashable callable
            return out
        if name is not None:
            self.check.observe(name, args, kwargs or {})
        elif func in _BACKWARD:
            self.check.backward_done()
        return out


class LossCheck:
    """Watches the losses computed from one model's output during monitored steps.

    ``record`` returns the probe record that calls are added to (``.loss_calls``).
    """

    def __init__(self, root: nn.Module, guard: Guard, record: Callable[[], Any]) -> None:
        self._guard = guard
        self._record = record
        #: id(module) -> (module, name, has parameters, is a loss module), for the model's
        self._modules: dict[int, tuple[nn.Module, str, bool, bool]] = {}
        compiled = False
        for name, module in root.named_modules():
            has_params = next(module.parameters(recurse=False), None) is not None
            is_loss = isinstance(module, _LOSS_MODULE)
            self._modules[id(module)] = (module, name, has_params, is_loss)
            compiled = compiled or hasattr(module, "_orig_mod")
        # A compiled part would be traced with the hooks in it: stay out (as attention does).
        self._off = compiled
        self._mode = _Mode(self)
        #: the probes' module hooks hand module calls to before_module/after_module
        self.armed = False
        self._depth = 0
        self._pushed = False
        self._open = False  # losses seen now belong to the monitored step
        #: the loss module the window was opened for, inside the forward (the probes' hooks
        #: close it when that module returns)
        self.pushed_by: nn.Module | None = None
        # The innermost module that returned the latest output, and that output: held
        # plainly while the outermost call runs (the caller holds it at least until the
        # next module returns anyway, and a weak reference per module call costs ~0.2 us
        # of a monitored step's forward), as a weak reference once it returned.
        self._last_out: torch.Tensor | None = None
        self._last_name: str | None = None
        self._last: tuple[weakref.ref, str] | None = None
        self._last_layer: str | None = None
        self._handlers: dict[int, tuple[nn.Module, PreHandler, PostHandler]] | None = None
        #: called when the check switches itself off (a failure)
        self.on_shut_down: Callable[[], None] | None = None

    def arm(self) -> None:
        """Look at the module calls of the next forward pass (the probes' hooks run after the
        attention capture's, which leaves its mode at the same moment)."""
        self.disarm()
        self.armed = not self._off

    def disarm(self) -> None:
        self.armed = False
        self.close_window()

    def close_window(self) -> None:
        """No later loss belongs to this step: take the mode off the stack, forget the pass."""
        if not self._pushed and self._last is None and not self._depth:
            return  # nothing open (every step calls this: keep it to one test)
        self._depth = 0
        self._last = None
        self._last_out = None
        self._last_layer = None
        self._leave()

    def _leave(self) -> None:
        self._open = False
        self.pushed_by = None
        if self._pushed:
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is self._mode:
                _pop_mode()
                self._pushed = False
            # else: another mode sits above ours; ours stays inert (closed) until it can go

    def backward_done(self) -> None:
        """The step's losses are all computed: stop looking (the mode comes off the stack
        at the next chance: ``watcher.step()`` or the next forward pass)."""
        self._open = False

    def shut_down(self, error: BaseException | None = None) -> None:
        self._off = True
        if error is not None:
            self._guard.fail("loss checks", error)
        self.disarm()
        if self.on_shut_down is not None:
            self.on_shut_down()  # the probes take this check's handlers out of their table

    # -- the forward pass ------------------------------------------------------------

    # The probes' global hooks run for every module call of the process while armed. They
    # look the module up once in a table (see Probes.arm) that holds, for each of the
    # model's modules, the handlers below, made once per module with what they need bound
    # in (its name, whether it owns parameters, whether it is a loss): no second lookup
    # and no per-call test of facts that never change. Modules from outside the model go
    # to foreign_before/foreign_after.
    def module_handlers(self) -> dict[int, tuple[nn.Module, PreHandler, PostHandler]]:
        """id(module) -> (module, before, after) for each of the model's modules."""
        if self._handlers is None:  # made once: every monitored step arms them
            self._handlers = {
                key: (
                    module,
                    self._make_before(is_loss),
                    self._make_after(name, has_params, is_loss),
                )
                for key, (module, name, has_params, is_loss) in self._modules.items()
            }
        return self._handlers

    def _make_before(self, is_loss: bool) -> PreHandler:
        def before(module: nn.Module, args: Any) -> None:
            if self._depth:
                self._depth += 1
            else:
                if in_backward() or is_compiling():
                    return None  # checkpointing recomputes; torch.compile traces
                self.close_window()  # a new pass of the model: the last one's losses are done
                self._depth = 1
            if is_loss and not self._open and grad_enabled():
                # a loss module called while the mode is off (inside the model's forward)
                self._open_window(module)
            return None

        return before

    def _make_after(self, name: str, has_params: bool, is_loss: bool) -> PostHandler:
        def after(module: nn.Module, args: Any, output: Any) -> None:
            if is_loss and self.pushed_by is module:
                self._leave()  # the loss module inside the forward is done
            depth = self._depth
            if not depth:
                return None
            self._depth = depth - 1
            try:
                tensor = output if type(output) is _Tensor else first_tensor(output)
                if tensor is not None and tensor is not self._last_out:
                    self._last_out, self._last_name = tensor, name
                if has_params:
                    self._last_layer = name
                if depth == 1:
                    self._let_go()
                    # No tensor: the forward raised (this hook runs anyway, to keep the
                    # depth right) or returned nothing a loss could be computed from.
                    if tensor is not None and grad_enabled():
                        self._open_window(None)
            except Exception as error:
                self.shut_down(error)
            return None

        return after

    def _let_go(self) -> None:
        """The outermost call returned: keep its latest output by a weak reference only."""
        out = self._last_out
        if out is not None:
            self._last = (weakref.ref(out), self._last_name)  # type: ignore[assignment]
            self._last_out = None

    def foreign_before(self, module: nn.Module) -> None:
        """A module from outside the model starts: a loss module opens the window."""
        if isinstance(module, _LOSS_MODULE) and not self._open and grad_enabled():
            self._open_window(module)

    def foreign_after(self, module: nn.Module) -> None:
        """A module from outside the model returns (called when it is :attr:`pushed_by`)."""
        self._leave()  # the loss module is done

    def _open_window(self, module: nn.Module | None) -> None:
        if self._off:
            return  # shut down: its handlers may still be in this arming's table
        self._open = True
        self.pushed_by = module
        if self._pushed:
            return  # still on the stack (under another mode): it serves again
        try:
            _push_mode(self._mode)
        except Exception as error:
            self.shut_down(error)
            return
        self._pushed = True

    # -- the mode --------------------------------------------------------------------

    def observe(self, function: str, args: tuple, kwargs: dict) -> None:
        if not self._open or self._off or is_compiling():
            return
        try:
            with torch.no_grad():
                self._observe(function, args, kwargs)
        except Exception as error:
            self.shut_down(error)

    def _observe(self, function: str, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if (
            not isinstance(x, torch.Tensor)
            or not x.requires_grad  # trains nothing: a teacher, a metric
            or not x.is_floating_point()
            or x.dim() == 0
            or x.numel() == 0
            or x.is_nested
        ):
            return
        record = self._record()
        if len(record.loss_calls) >= MAX_CALLS:
            return
        if function in CLASS_LOSSES:
            classes = int(x.shape[0 if x.dim() == 1 else 1])
            if classes < 2:
                return
            values = class_statistics(x)
        else:
            classes = int(x.shape[-1]) if x.dim() >= 2 else 1
            values = binary_statistics(x, target)
        if self._last_out is not None:  # a loss module inside the forward pass
            producer = self._last_name if self._last_out is x else None
        else:
            last = self._last
            producer = last[1] if last is not None and last[0]() is x else None
        record.loss_calls.append(
            LossCall(
                function=function,
                producer=producer,
                last_layer=self._last_layer,
                via=made_by(x),
                classes=classes,
                rows=x.numel() // max(1, classes),
                values=values,
            )
        )
