"""The documentation gradwatch writes about itself: the rules reference
(``docs/rules.md``), the options table (``docs/options.md``) and the README's rule table,
each produced from the code (the rules' texts, the signatures) and never typed by hand::

    python -m gradwatch.docs --write     # rewrite them
    python -m gradwatch.docs --check     # exit 1 and show the difference if they drifted

The test suite (``tests/test_docs.py``) fails while a committed file differs from what
the code produces, so a rule added or an option changed shows up in the docs by
rerunning the command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .rules import readme_rule_table, rules_reference

#: README blocks written here: ``<!-- gradwatch-docs:NAME -->`` ...
#: ``<!-- /gradwatch-docs:NAME -->``.
README_KIND = "docs"


def generated_files() -> dict[str, Callable[[], str]]:
    """Each generated file (relative to the repository root) and what writes it."""
    from .options import options_reference

    return {"docs/rules.md": rules_reference, "docs/options.md": options_reference}


def readme_blocks() -> dict[str, str]:
    """The README's blocks written from the code, by name."""
    return {"rules": readme_rule_table()}


def expected(root: Path) -> dict[Path, str]:
    """Every generated file's path under ``root`` and the text it must have."""
    from ..demo.readme import replace_blocks

    texts = {root / name: write() for name, write in generated_files().items()}
    readme = root / "README.md"
    texts[readme] = replace_blocks(readme.read_text(encoding="utf-8"), readme_blocks(), README_KIND)
    return texts


__all__ = ["expected", "generated_files", "readme_blocks", "readme_rule_table", "rules_reference"]
