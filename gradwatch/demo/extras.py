"""Optional dependencies of the demo and the report, imported only when used.

The core of gradwatch needs torch and rich alone; the demo's data comes from
scikit-learn and the figures from matplotlib. A missing one is a
:class:`MissingExtra` that names the extra to install, never an ``ImportError``
with a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..install import install_hint


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says how to install it."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` saying how to install the extra.

    >>> require("json", extra="demo", purpose="reading records").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingExtra(
            f"{purpose} needs {package}, which is not installed ({error}). "
            f"Install it with: {install_hint(extra)}"
        ) from None


def figure_class() -> type:
    """matplotlib's ``Figure``, used without pyplot so no GUI backend is touched."""
    require("matplotlib", extra="plot", purpose="drawing figures (--png)")
    figure = require("matplotlib.figure", extra="plot", purpose="drawing figures (--png)")
    return figure.Figure
