"""How to install an optional part of gradwatch, said the way that works where it is.

gradwatch is installed from a clone (``pip install -e .``), so ``pip install
'gradwatch[demo]'`` would look for a package on PyPI instead of adding the extra; the
line a user can paste names the packages themselves, with their versions, and the clone
form of the extra.
"""

from __future__ import annotations

import importlib.metadata
import re

_EXTRA_MARKER = re.compile(r"""^(?P<requirement>[^;]+);\s*extra\s*==\s*["'](?P<extra>[\w-]+)["']""")


def extra_packages(extra: str) -> list[str]:
    """The requirements an extra adds, as the installed gradwatch declares them
    (``[]`` when that is not known).

    >>> extra_packages("demo")
    ['scikit-learn>=1.2']
    """
    try:
        requirements = importlib.metadata.requires("gradwatch") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for line in requirements:
        match = _EXTRA_MARKER.match(line)
        if match and match["extra"] == extra:
            found.append(match["requirement"].strip())
    return found


def install_hint(extra: str) -> str:
    """What to run to get an extra, e.g. for a missing scikit-learn.

    >>> install_hint("demo")
    'pip install "scikit-learn>=1.2" (or, in your gradwatch clone: pip install -e ".[demo]")'
    """
    clone = f'pip install -e ".[{extra}]"'
    packages = extra_packages(extra)
    if not packages:
        return f"{clone} (in your gradwatch clone)"
    quoted = " ".join(f'"{p}"' if any(c in p for c in "<>=!~") else p for p in packages)
    return f"pip install {quoted} (or, in your gradwatch clone: {clone})"
