"""``python -m gradwatch.docs --write | --check [ROOT]``: see :mod:`gradwatch.docs`."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from . import expected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradwatch.docs",
        description="Rewrite (--write) or check (--check) docs/rules.md, docs/options.md and "
        "the README's rule table from the code.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the files in place")
    action.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    parser.add_argument("root", nargs="?", default=".", help="the repository (default: .)")
    args = parser.parse_args(argv)
    drifted = 0
    for path, text in expected(Path(args.root)).items():
        now = path.read_text(encoding="utf-8") if path.exists() else ""
        if now == text:
            continue
        drifted += 1
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"{path}: rewritten")
        else:
            diff = difflib.unified_diff(
                now.splitlines(), text.splitlines(), f"{path} (now)", "from the code", lineterm=""
            )
            print("\n".join(diff))
    if args.check and drifted:
        print(f"{drifted} file(s) differ from the code: python -m gradwatch.docs --write")
        return 1
    if not drifted:
        print("the generated docs match the code")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
