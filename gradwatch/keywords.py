"""Unknown keyword arguments answered with the closest option name.

Python's own message for a misspelled option names the function that received it
(often an internal ``__init__``) and offers no correction. :func:`suggest_keywords`
wraps a function whose keyword arguments are all explicit: a name it does not take is
a ``TypeError`` that says which public call was made, suggests the closest options, and
lists what it accepts. The wrapped function keeps its signature for ``help()`` and IDEs.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


def unknown_keyword_error(call: str, name: str, accepted: Iterable[str]) -> TypeError:
    """The error for one keyword ``name`` that ``call`` does not take.

    >>> str(unknown_keyword_error("gradwatch.watch()", "every_n_step", ["every_n_steps", "rules"]))
    "gradwatch.watch() has no option 'every_n_step'; did you mean 'every_n_steps'?"
    >>> str(unknown_keyword_error("gradwatch.watch()", "colour", ["rules", "layers"]))
    "gradwatch.watch() has no option 'colour'; its options are: layers, rules"
    """
    options = sorted(accepted)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    if close:
        tail = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        tail = "its options are: " + ", ".join(options)
    return TypeError(f"{call} has no option {name!r}; {tail}")


def suggest_keywords(call: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a function (or ``__init__``) so that an unknown keyword argument raises
    :func:`unknown_keyword_error` naming ``call`` (e.g. ``"gradwatch.watch()"``).

    >>> @suggest_keywords("demo()")
    ... def demo(*, every_n_steps: int = 15) -> int:
    ...     return every_n_steps
    >>> demo(every_n_step=3)
    Traceback (most recent call last):
    ...
    TypeError: demo() has no option 'every_n_step'; did you mean 'every_n_steps'?
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        parameters = inspect.signature(fn).parameters
        accepted = frozenset(
            name
            for name, p in parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
        )

        @functools.wraps(fn)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            for name in kwargs:
                if name not in accepted:
                    raise unknown_keyword_error(call, name, accepted)
            return fn(*args, **kwargs)

        return checked

    return decorate


__all__ = ["suggest_keywords", "unknown_keyword_error"]
