"""Argument checks shared by the public constructors (``watch()``, the framework
callbacks): each wrong value is a ``ValueError`` that names the option and says what it
accepts, raised when the watcher or callback is built, never later during training."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module is also used where torch is not imported (the CLI)
    from torch import nn


def whole_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (or None when allowed).

    >>> whole_number("every_n_steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: every_n_steps must be a whole number >= 1, got 0
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a whole number >= 1{extra}, got {value!r}")


def deferred_option(value: Any) -> None:
    if value not in (True, False, "auto"):
        raise ValueError(f"deferred must be True, False or 'auto', got {value!r}")


def flag(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is True or False (or None when allowed)."""
    if isinstance(value, bool) or (value is None and allow_none):
        return
    extra = ", False or None" if allow_none else " or False"
    raise ValueError(f"{name} must be True{extra}, got {value!r}")


def string_list(name: str, value: Any, *, what: str) -> list[str] | None:
    """``None``, or the strings of ``value`` as a list; a single string is one item.

    ``what`` says what one item is, for the error message. Used for ``select``,
    ``ignore`` (rule codes, code prefixes or slugs) and ``layers``, ``exclude`` (module
    name patterns).

    >>> string_list("select", "GW101", what="a rule code, code prefix or slug")
    ['GW101']
    >>> string_list("select", ["GW1", 3], what="a rule code, code prefix or slug")
    Traceback (most recent call last):
    ...
    ValueError: select must be a rule code, code prefix or slug, or a list of them; item 1 is 3
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
    else:
        raise ValueError(f"{name} must be {what}, or a list of them; got {value!r}")
    for position, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(
                f"{name} must be {what}, or a list of them; item {position} is {item!r}"
            )
    return items


def reporter_list(value: Any, *, name: str = "reporters") -> list[Any] | None:
    """``None``, or ``value`` as a list of reporters (objects with a ``report`` method);
    a single reporter is one item.

    >>> reporter_list(object())
    Traceback (most recent call last):
    ...
    ValueError: reporters must be a list of gradwatch.Reporter objects ([] for none), got an object
    """
    if value is None:
        return None
    if _is_reporter(value):
        return [value]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be a list of gradwatch.Reporter objects ([] for none), "
            f"got {_a(value)}"
        )
    items = list(value)
    for position, item in enumerate(items):
        if not _is_reporter(item):
            raise ValueError(
                f"{name}[{position}] ({_a(item)}) has no report(stats, findings) method; "
                "subclass gradwatch.Reporter"
            )
    return items


def threshold_table(value: Any) -> dict[str, dict[str, Any]]:
    """``thresholds=`` as ``{rule code or slug (lower case): {name: value}}``.

    >>> threshold_table({"GW101": {"ratio": 1e-3}})
    {'gw101': {'ratio': 0.001}}
    >>> threshold_table({"GW101": 0.5})
    Traceback (most recent call last):
    ...
    ValueError: thresholds['GW101'] must map threshold names to values ({'ratio': 0.001}); got 0.5
    """
    if value is None:
        return {}
    example = "e.g. {'GW101': {'ratio': 0.001}}"
    if not isinstance(value, Mapping):
        raise ValueError(
            f"thresholds must be a dict of rule codes or slugs to dicts of threshold "
            f"values, {example}; got {value!r}"
        )
    table: dict[str, dict[str, Any]] = {}
    for rule, overrides in value.items():
        if not isinstance(rule, str) or not rule.strip():
            raise ValueError(
                f"thresholds keys must be rule codes or slugs ({example}); got {rule!r}"
            )
        if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
            raise ValueError(
                f"thresholds[{rule!r}] must map threshold names to values "
                f"({{'ratio': 0.001}}); got {overrides!r}"
            )
        table.setdefault(rule.strip().lower(), {}).update(overrides)
    return table


def scripted_parts(root: nn.Module) -> list[str]:
    """Names of the outermost TorchScript modules (``torch.jit.script``/``trace``) in
    ``root`` (``""``: the root itself). Their layers run inside the TorchScript
    interpreter: no Python hook sees them, and they no longer say what kind of layer
    they are (every one is a ``RecursiveScriptModule``)."""
    import torch

    found: list[str] = []
    for name, module in root.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(
            name == part or name.startswith(part + ".") or part == "" for part in found
        ):
            found.append(name)
    return found


def _is_reporter(value: Any) -> bool:
    return not isinstance(value, type) and callable(getattr(value, "report", None))


def _a(value: Any) -> str:
    kind = type(value).__name__
    return f"an {kind}" if kind[:1].lower() in "aeiou" else f"a {kind}"


def optimizer_object(value: Any, *, name: str = "optimizer") -> None:
    """Raise ``ValueError`` unless ``value`` is None or an optimizer instance (anything
    with ``param_groups``, or a wrapper whose ``.optimizer`` has them): the class itself,
    or the model, would quietly switch the learning-rate-aware checks off.

    >>> import torch
    >>> optimizer_object(torch.optim.SGD)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: optimizer= must be an optimizer instance, ... not the class SGD
    """
    if value is None:
        return
    from torch import nn

    if isinstance(value, type):
        raise ValueError(
            f"{name}= must be an optimizer instance, e.g. "
            f"{_qualified(value)}(model.parameters(), lr=0.1), not the class {value.__name__}"
        )
    if isinstance(value, nn.Module):
        raise ValueError(
            f"{name}= got a model ({type(value).__name__}), not an optimizer: pass the "
            "optimizer that steps it (the object whose .step() you call)"
        )
    inner = getattr(value, "optimizer", None)
    if not hasattr(value, "param_groups") and not hasattr(inner, "param_groups"):
        raise ValueError(
            f"{name}= must be an optimizer (an object with param_groups, such as a "
            f"torch.optim.Optimizer), got {_a(value)}"
        )


def loss_argument(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None, a number or a one-element tensor.

    A per-sample loss (``reduction="none"``) is refused rather than reduced: gradwatch
    cannot know which reduction the training uses; pass the value ``backward()`` was
    called on.

    >>> import torch
    >>> loss_argument(torch.ones(4))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: step(loss=...) must be one value ..., got a tensor of shape (4,)
    """
    if value is None:
        return
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                "step(loss=...) must be one value (the loss backward() was called on, e.g. "
                f"loss.mean()), got a tensor of shape {tuple(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"step(loss=...) must be a number or a one-element tensor, got {_a(value)} "
            f"({value!r:.40})"
        )


def _qualified(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.optim"):
        module = "torch.optim"
    return f"{module}.{cls.__qualname__}" if module != "builtins" else cls.__qualname__
