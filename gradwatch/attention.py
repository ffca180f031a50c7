"""Attention probabilities, measured during monitored forward passes.

Attention is written many ways: an ``nn.Softmax`` module, ``torch.softmax`` /
``F.softmax`` / ``Tensor.softmax`` inside a custom module, or
``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``, Hugging Face's "sdpa",
most modern code). One mechanism sees all of them: a ``TorchFunctionMode``, on the stack
only during monitored forward passes of the watched model. Global module hooks (armed
only ahead of monitored steps, like the other probes) keep a stack of the model's
modules that are running and push the mode: over the whole forward pass on discovery
passes (the first monitored step, then detail steps), otherwise only while a module
that computed attention in the last discovery pass runs (never, in a model without
attention). The post-hook that pops it runs even when the forward raises; the backward
pass, the optimizer and the rest of the program never pass through the mode.

What counts as attention:

- a softmax over the last axis whose probabilities then weight a matrix product
  (``probs @ v``, ``bmm``, ``einsum``, through dropout or dtype casts in between): a
  softmax that ends a classifier, or a gate, is not attention and is not judged;
- every ``F.scaled_dot_product_attention`` call: its probabilities never exist outside
  the kernel, so the logits of a bounded sample of rows are recomputed from ``q`` and
  ``k`` with the call's own scale, mask, causal flag and grouped-query layout.

Each call is attributed to the innermost module running it (an ``nn.Softmax`` module is
named along with the module that called it), and keeps a fixed sample of its logit rows
on the device (see :mod:`gradwatch.attention_sample`); the statistics of all calls are
computed together when the step is measured and travel in the step's one transfer. On
detail steps, three full-tensor counts are added per call: rows whose probabilities are
NaN/Inf, rows whose logits already were, and rows whose every key is masked.

Not measured: compiled models or compiled parts of a model, calls under ``no_grad``
(validation), activation-checkpointing recomputation, and fused kernels whose
probabilities never exist (flash attention inside a custom op): said once.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import (
    TorchFunctionMode,
    _get_current_function_mode_stack,
    _pop_mode,
    _push_mode,
)

from .attention_sample import (
    AttentionCall,
    defer_sdpa_logits,
    gather_rows,
    sample_plan,
    sdpa_logits,
)
from .attention_sample import full_precision as _full_precision
from .forward_context import grad_enabled, in_backward, is_compiling
from .guard import Guard
from .stats import MASK_LEVEL

_F32 = torch.float32

#: Calls measured per monitored step (beyond it, the first ones of the step).
MAX_CALLS = 512

# -- which torch functions matter ----------------------------------------------------

_LEAF, _SOFTMAX, _SDPA, _MATMUL, _SCALE, _COMPOSITE = range(6)  # _LEAF: not in _KINDS


def _methods(*names: str) -> list[Any]:
    found = []
    for owner in (torch.Tensor, torch._C.TensorBase):
        for name in names:
            method = getattr(owner, name, None)
            if method is not None:
                found.append(method)
    return found


_KINDS: dict[Any, int] = {}
for _f in [torch.softmax, F.softmax, getattr(torch.special, "softmax", None), *_methods("softmax")]:
    if _f is not None:
        _KINDS[_f] = _SOFTMAX
_KINDS[F.scaled_dot_product_attention] = _SDPA
for _f in [
    torch.matmul,
    torch.bmm,
    torch.einsum,
    torch.baddbmm,
    *_methods("matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm"),
]:
    _KINDS[_f] = _MATMUL
for _f in [
    torch.mul,
    torch.div,
    torch.true_divide,
    *_methods(
        "mul",
        "div",
        "mul_",
        "div_",
        "__mul__",
        "__rmul__",
        "__truediv__",
        "__imul__",
        "__itruediv__",
        "true_divide",
    ),
]:
    _KINDS[_f] = _SCALE
# Python functions that compute attention with other torch functions. A mode is off
# while it handles a call, so it cannot see inside them; instead, while such a function
# runs, the names it calls those functions by (globals of its own module) point to
# measuring wrappers. nn.MultiheadAttention: F.multi_head_attention_forward calls
# torch.nn.functional's softmax (need_weights=True) or scaled_dot_product_attention.
_KINDS[F.multi_head_attention_forward] = _COMPOSITE
_INSIDE: dict[Any, tuple[str, ...]] = {
    F.multi_head_attention_forward: ("softmax", "scaled_dot_product_attention"),
}
_DIVIDES = frozenset(
    f
    for f in [
        torch.div,
        torch.true_divide,
        *_methods("div", "div_", "__truediv__", "__itruediv__", "true_divide"),
    ]
)


def _kind(func: Any) -> int:
    try:
        return _KINDS.get(func, _LEAF)
    except TypeError:  # an unhashable callable
        return _LEAF


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _usual_scale(args: tuple, kwargs: dict) -> tuple[float, int] | None:
    """F.multi_head_attention_forward's (scale, head size): it always divides q.k by
    sqrt(embed_dim / num_heads)."""
    try:
        embed = int(args[3] if len(args) > 3 else kwargs["embed_dim_to_check"])
        heads = int(args[4] if len(args) > 4 else kwargs["num_heads"])
        head_dim = embed // heads
        return 1.0 / math.sqrt(head_dim), head_dim
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().to(_F32)


# -- the capture ----------------------------------------------------------------------


class _Mode(TorchFunctionMode):
    """Hands every torch function call of a monitored forward pass to the capture."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            kind = _KINDS.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is None:  # most calls: run it, pass a tag on if one is in flight
            out = func(*args, **kwargs) if kwargs else func(*args)
            capture = self.capture
            if capture._tags and not capture._off:
                capture.propagate(args, out)
            return out
        return self.capture.handle(kind, func, args, kwargs or {})


@dataclass
class _Tag:
    """What a tensor in flight is: attention scores (q.k, maybe scaled) or probabilities."""

    call: AttentionCall | None = None  # probabilities of this call
    head_dim: int | None = None  # scores: the size of the contracted axis of q.k
    scale: float = 1.0
    scaled: bool = False  # a scalar factor was seen (else q or k may carry it)


class AttentionCapture:
    """Captures attention calls of one watched model during monitored forward passes.

    ``record`` returns the probe record that calls are added to (``.attention``, and
    ``.order`` for the forward position on detail steps).
    """

    def __init__(
        self,
        root: nn.Module,
        watched: set[str],
        guard: Guard,
        record: Callable[[], Any],
    ) -> None:
        self._guard = guard
        self._record = record
        self._names: dict[int, tuple[nn.Module, str]] = {}
        self._softmax_modules: set[int] = set()
        in_scope: set[str] = set()
        for name in watched:  # a watched module and every module that contains one
            parts = name.split(".") if name else []
            for cut in range(len(parts) + 1):
                in_scope.add(".".join(parts[:cut]))
        self._in_scope: set[int] = set()
        compiled = False
        attention_like: list[str] = []
        for name, module in root.named_modules():
            self._names[id(module)] = (module, name)
            if name in in_scope or name in watched:
                self._in_scope.add(id(module))
            if isinstance(module, nn.Softmax):
                self._softmax_modules.add(id(module))
            compiled = compiled or hasattr(module, "_orig_mod")
            kind = type(module).__name__.lower()
            if ("attention" in kind or "attn" in kind) and name in in_scope:
                attention_like.append(name)
        # Innermost attention-looking modules: where a fused kernel would hide the
        # probabilities (said once when no call was seen inside one).
        self._attention_like = [
            n for n in attention_like if not any(o.startswith(n + ".") for o in attention_like)
        ]
        self._off = compiled
        if compiled:
            guard.say_once(
                "attention-compiled",
                "gradwatch: part of the model is torch.compile'd; attention softmax "
                "statistics (saturation, logit growth, masked rows) are not measured.",
                level=logging.INFO,
            )
        self._mode = _Mode(self)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stack: list[nn.Module] = []
        self._pushed = False
        self._pushed_by: nn.Module | None = None
        self._tags: dict[int, tuple[weakref.ref, _Tag]] = {}
        self._detail = False
        self._seen_modules: set[str] = set()
        self._passes = 0
        # Discovery passes (the first monitored one, then those of detail steps) hold the
        # mode over the whole forward pass; the others only while a module that computed
        # attention in the last discovery pass runs (nothing at all in a model without
        # attention), so that the MLPs, norms and embeddings run outside the mode.
        self._discovering = False
        self._discovered = False
        self._targets: set[int] = set()
        self._by_name = {name: module for module, name in self._names.values()}

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    @property
    def active(self) -> bool:
        return not self._off

    def arm(self, detail: bool) -> None:
        self._detail = detail
        if self._off or self._handles:
            return
        if self._discovered and not self._targets and not detail:
            return  # no attention was found: nothing to look for until the next detail step
        self._handles.append(register_module_forward_pre_hook(self._pre))
        self._handles.append(register_module_forward_hook(self._post, always_call=True))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._end_pass()
        self._stack.clear()

    def shut_down(self, error: BaseException | None = None) -> None:
        self._off = True
        if error is not None:
            self._guard.fail("attention probes", error)
        if not self._stack:
            self.disarm()
        # else: inside a forward pass (perhaps inside the mode's own handler, where the
        # mode is off the stack): the pass's end pops the mode and removes the hooks.

    # -- the forward pass ------------------------------------------------------------

    def _pre(self, module: nn.Module, args: Any) -> None:
        entry = self._names.get(id(module))
        if entry is None or entry[0] is not module:
            return None
        stack = self._stack
        if not stack:
            # A pass of our model starts: only training passes (gradients on) that are
            # neither traced by torch.compile nor recomputed by checkpointing.
            if self._off or not grad_enabled() or is_compiling() or in_backward():
                return None
            self._end_pass()  # a mode left behind by an earlier pass, if it can go
            self._discovering = self._detail or not self._discovered
            if self._discovering:
                self._push(module)
        stack.append(module)
        if not self._pushed and id(module) in self._targets:
            self._push(module)
        return None

    def _push(self, module: nn.Module) -> None:
        if self._pushed:
            return
        try:
            _push_mode(self._mode)
        except Exception as error:
            self.shut_down(error)
            return
        self._pushed, self._pushed_by = True, module

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack
        if not stack:
            return None
        if stack[-1] is module:
            stack.pop()
        else:
            for position in range(len(stack) - 1, -1, -1):
                if stack[position] is module:
                    del stack[position:]
                    break
            else:
                return None
        if self._pushed_by is module:
            self._end_pass()  # the attention module (or the whole pass) is done
        if not stack:
            self._end_pass()
            if self._off:
                self.disarm()
                return None
            self._passes += 1
            if self._passes == 1:
                self._note_hidden()
            if self._discovering:
                self._discovered = True
                self._targets = {
                    id(self._by_name[name]) for name in self._seen_modules if name in self._by_name
                }
                self._seen_modules = set()
        return None

    def _end_pass(self) -> None:
        self._tags.clear()
        if not self._pushed:
            return
        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is self._mode:
            _pop_mode()
            self._pushed, self._pushed_by = False, None
        # else: another mode sits above ours (pushed inside the forward and left there);
        # popping would remove it. Ours then stays inert until it can be popped.

    def _note_hidden(self) -> None:
        """Say once which attention modules ran without any visible probabilities."""
        hidden = [
            name
            for name in self._attention_like
            if not any(
                seen == name or seen.startswith(name + ".") or name.startswith(seen + ".")
                for seen in self._seen_modules
            )
        ]
        if hidden:
            more = f" and {len(hidden) - 4} more" if len(hidden) > 4 else ""
            shown = ", ".join(hidden[:4]) + more
            self._guard.say_once(
                "attention-hidden",
                f"gradwatch: no attention probabilities were seen in {shown} (a fused "
                "kernel, a custom op or a compiled part computes them): attention "
                "saturation and logit growth are not measured there.",
                level=logging.INFO,
            )

    # -- the mode --------------------------------------------------------------------

    def propagate(self, args: tuple, out: Any) -> None:
        try:
            self._propagate(args, out)
        except Exception as error:
            self.shut_down(error)

    def handle(self, kind: int, func: Any, args: tuple, kwargs: dict) -> Any:
        """A call of one of the functions that matter (softmax, SDPA, products, scalings)."""
        if kind == _COMPOSITE:
            return self._composite(func, args, kwargs)
        out = func(*args, **kwargs)
        if self._off or not self._stack:
            return out
        if kind == _SOFTMAX:
            self._guarded(self._softmax, args, kwargs, out)
        elif kind == _SDPA:
            self._guarded(self._sdpa, args, kwargs, out)
        elif kind == _MATMUL:
            self._guarded(self._matmul, func, args, out)
        else:
            self._guarded(self._scale, func, args, out)
        return out

    def _composite(self, func: Any, args: tuple, kwargs: dict) -> Any:
        names = _INSIDE.get(func, ())
        space = getattr(func, "__globals__", None)
        if self._off or not self._stack or space is None:
            return func(*args, **kwargs)
        thread = threading.get_ident()
        saved = {name: space[name] for name in names if name in space}
        known = _usual_scale(args, kwargs)

        def wrap(original: Any) -> Any:
            kind = _kind(original)

            def measured(*a: Any, **k: Any) -> Any:
                out = original(*a, **k)
                if threading.get_ident() == thread and not self._off and self._stack:
                    if kind == _SOFTMAX:
                        self._guarded(self._softmax, a, k, out, known)
                    elif kind == _SDPA:
                        self._guarded(self._sdpa, a, k, out)
                return out

            return measured

        for name, original in saved.items():
            space[name] = wrap(original)
        try:
            return func(*args, **kwargs)
        finally:
            space.update(saved)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as error:
            self.shut_down(error)

    def _tag_of(self, value: Any) -> _Tag | None:
        if not isinstance(value, torch.Tensor):
            return None
        found = self._tags.get(id(value))
        if found is None or found[0]() is not value:
            return None
        return found[1]

    def _set_tag(self, tensor: torch.Tensor, tag: _Tag) -> None:
        tags = self._tags
        if len(tags) > 64:
            for key in [k for k, (ref, _) in tags.items() if ref() is None]:
                del tags[key]
            if len(tags) > 256:
                tags.clear()
        tags[id(tensor)] = (weakref.ref(tensor), tag)

    def _propagate(self, args: tuple, out: Any) -> None:
        """Shape-preserving operations (dropout, casts, masking) pass a tag on."""
        if not isinstance(out, torch.Tensor):
            return
        for value in args[:3]:
            tag = self._tag_of(value)
            if tag is not None and value.shape == out.shape:
                if out is not value:
                    self._set_tag(out, tag)
                return

    def _matmul(self, func: Any, args: tuple, out: Any) -> None:
        operands = args[1:] if func is torch.einsum else args
        if func is torch.einsum and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        for value in operands:
            tag = self._tag_of(value)
            if tag is not None and tag.call is not None:
                tag.call.confirmed = True  # probabilities weighting a sum: attention
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            return
        tensors = [a for a in operands if isinstance(a, torch.Tensor)]
        if func in (torch.baddbmm,) or len(tensors) < 2:
            # baddbmm's q may be pre-scaled; einsum's contracted axis is not known
            head_dim = None
            if func is torch.baddbmm and len(tensors) >= 3:
                head_dim = tensors[1].shape[-1]
            self._set_tag(out, _Tag(head_dim=head_dim))
            return
        first = tensors[0]
        head_dim = first.shape[-1] if func is not torch.einsum and first.dim() >= 2 else None
        self._set_tag(out, _Tag(head_dim=head_dim))

    def _scale(self, func: Any, args: tuple, out: Any) -> None:
        if len(args) < 2 or not isinstance(out, torch.Tensor):
            return
        tensor, factor = args[0], args[1]
        tag = self._tag_of(tensor)
        if tag is None and isinstance(factor, torch.Tensor):
            tensor, factor = factor, tensor  # 2.0 * scores
            tag = self._tag_of(tensor)
            if func in _DIVIDES:
                return  # a number divided by scores: not a scale
        if tag is None:
            return
        if tag.call is not None or not isinstance(factor, (int, float)) or isinstance(factor, bool):
            if out is not tensor:
                self._set_tag(out, tag)
            return
        value = float(factor)
        if func in _DIVIDES:
            value = 1.0 / value if value else math.inf
        new = _Tag(head_dim=tag.head_dim, scale=tag.scale * value, scaled=True)
        self._set_tag(out, new)

    # -- measuring -------------------------------------------------------------------

    def _where(self) -> tuple[str, str] | None:
        """(attention module, nn.Softmax module or "") of the call being made now."""
        stack = self._stack
        innermost = stack[-1]
        softmax = ""
        if id(innermost) in self._softmax_modules:
            softmax = self._names[id(innermost)][1]
            if len(stack) < 2:
                return None
            innermost = stack[-2]
        if id(innermost) not in self._in_scope:
            return None
        return self._names[id(innermost)][1], softmax

    def _new_call(self) -> tuple[Any, tuple[str, str]] | None:
        record = self._record()
        if len(record.attention) >= MAX_CALLS:
            return None
        where = self._where()
        if where is None:
            return None
        return record, where

    def _softmax(
        self, args: tuple, kwargs: dict, out: Any, known: tuple[float, int] | None = None
    ) -> None:
        """A softmax call. ``known``: made by a function that computes attention, with
        this (scale, head size); its probabilities are attention without further proof."""
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if (
            not isinstance(x, torch.Tensor)
            or not isinstance(out, torch.Tensor)
            or not out.is_floating_point()
            or x.dim() < 2
            or not isinstance(dim, int)
            or dim % x.dim() != x.dim() - 1
            or x.is_nested
        ):
            return
        found = self._new_call()
        if found is None:
            return
        record, (module, softmax) = found
        logits = x.detach()
        plan = sample_plan(tuple(x.shape[:-2]), x.shape[-2], x.device, x.shape[-1])
        with _full_precision(x.device):
            sample = gather_rows(logits, plan)
            detail = None
            if self._detail:
                row_max = logits.amax(-1)
                row_sum = out.detach().sum(-1, dtype=_F32)
                detail = torch.stack(
                    [
                        _count(~torch.isfinite(row_sum)),
                        _count(torch.isnan(row_max) | (row_max == math.inf)),
                        _count(row_max <= MASK_LEVEL),
                    ]
                )
        tag = self._tag_of(x)
        scale, head_dim = known if known else (None, None)
        if tag is not None and not known:
            scale, head_dim = (tag.scale if tag.scaled else None), tag.head_dim
        call = AttentionCall(
            module=module,
            softmax=softmax,
            via="nn.Softmax" if softmax else "softmax",
            keys=int(x.shape[-1]),
            rows=x.numel() // max(1, x.shape[-1]),
            depth=self._depth(record),
            sample=sample,
            detail=detail is not None,
            detail_values=detail,
            scale=scale,
            head_dim=head_dim,
            confirmed=known is not None,
        )
        record.attention.append(call)
        self._seen_modules.add(module)
        self._set_tag(out, _Tag(call=call))

    def _sdpa(self, args: tuple, kwargs: dict, out: Any) -> None:
        bound = dict(zip(_SDPA_ARGS, args))
        bound.update(kwargs)
        q, k = bound.get("query"), bound.get("key")
        mask = bound.get("attn_mask")
        if (
            not isinstance(q, torch.Tensor)
            or not isinstance(k, torch.Tensor)
            or q.dim() < 2
            or q.dim() != k.dim()
            or q.is_nested
            or k.is_nested
            or not q.is_floating_point()
        ):
            return
        found = self._new_call()
        if found is None:
            return
        record, (module, _) = found
        head_dim = int(q.shape[-1])
        scale = bound.get("scale")
        factor = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        lead, queries = tuple(q.shape[:-2]), int(q.shape[-2])
        plan = sample_plan(lead, queries, q.device, int(k.shape[-2]))
        with _full_precision(q.device):
            q, k = q.detach(), k.detach()
            mask = mask.detach() if isinstance(mask, torch.Tensor) else None
            causal = bool(bound.get("is_causal", False))
            # the logits of the common calls are computed when the step is packed,
            # batched over calls; the others now
            pending = defer_sdpa_logits(q, k, mask, causal, factor, plan)
            sample = None if pending is not None else sdpa_logits(q, k, mask, causal, factor, plan)
            detail = None
            if self._detail:
                zero = q.new_zeros((), dtype=_F32)
                rows = float(math.prod(lead) * queries)
                nonfinite = (
                    _count(~torch.isfinite(out.detach().sum(-1, dtype=_F32)))
                    if isinstance(out, torch.Tensor)
                    else zero
                )
                inputs = q.sum(dtype=_F32) + k.sum(dtype=_F32)
                bad_inputs = (~torch.isfinite(inputs)).to(_F32) * rows
                masked = zero
                if mask is not None:
                    fully = (
                        ~mask.any(-1) if mask.dtype == torch.bool else mask.amax(-1) <= MASK_LEVEL
                    )
                    # a row of the mask stands for every (batch, head, query) it broadcasts to
                    masked = _count(fully) * (rows / max(1, fully.numel()))
                detail = torch.stack([nonfinite, bad_inputs, masked.to(_F32)])
        call = AttentionCall(
            module=module,
            softmax="",
            via="scaled_dot_product_attention",
            keys=int(k.shape[-2]),
            rows=math.prod(lead) * queries,
            depth=self._depth(record),
            sample=sample,
            detail=detail is not None,
            detail_values=detail,
            scale=factor,
            head_dim=head_dim,
            confirmed=True,
            pending=pending,
        )
        record.attention.append(call)
        self._seen_modules.add(module)

    def _depth(self, record: Any) -> float | None:
        if not self._detail:
            return None
        return len(record.order) - 0.5
