"""One clear line when an integration's framework is not installed.

Every adapter in ``gradwatch.integrations`` imports its framework through :func:`require`,
so a missing package reads the same everywhere::

    ModuleNotFoundError: gradwatch.integrations.lightning needs lightning, which is not
    installed: pip install "lightning>=2.2" (or, in your gradwatch clone: pip install -e
    ".[lightning]")

instead of a bare ``No module named 'lightning'`` inside gradwatch's own code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gradwatch.install import install_hint


def require(package: str, *, extra: str, integration: str) -> ModuleType:
    """Import ``package`` or raise ``ModuleNotFoundError`` naming the extra that installs it.

    >>> require("math", extra="none", integration="an adapter").__name__
    'math'
    >>> require("absent", extra="x", integration="X")
    Traceback (most recent call last):
    ...
    ModuleNotFoundError: X needs absent, which is not installed: pip install -e ".[x]" (in ...)
    """
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as error:
        top = package.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the package is there but one of *its* dependencies is missing: say that
        message = f"{integration} needs {top}, which is not installed: {install_hint(extra)}"
        # ``from None``: the chained "No module named ..." traceback adds nothing to this line.
        raise ModuleNotFoundError(message, name=top) from None
