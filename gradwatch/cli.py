"""The ``gradwatch`` command: ``rules``, ``explain``, ``demo``, ``report``, ``run``.

Only ``demo`` (which trains) imports torch: ``--help``, ``rules``, ``explain`` and
``report`` answer without it, in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ._version import __version__
from .demo.options import add_arguments as add_demo_arguments
from .report import add_arguments as add_report_arguments
from .rules import BUILTIN_RULES, find_rule
from .run import add_arguments as add_run_arguments
from .topics import TOPICS, find_topic


def _rules(args: argparse.Namespace) -> int:
    if args.json:
        from .docs.rules import all_rule_facts

        print(json.dumps(all_rule_facts(BUILTIN_RULES), indent=2))
        return 0
    console = Console()
    table = Table(title="gradwatch rules", title_justify="left")
    for column in ("code", "slug", "severity", "what it means"):
        table.add_column(column)
    for cls in BUILTIN_RULES:
        table.add_row(cls.code, cls.slug, cls.severity, cls.summary)
    console.print(table)
    console.print("Details: gradwatch explain <code or slug>; as JSON: gradwatch rules --json")
    return 0


def reflow(text: str) -> str:
    r"""``text`` with each paragraph (and each "- " item) on one line, so the terminal
    wraps it to its own width instead of breaking the source's short lines again.

    >>> print(reflow("What it measures: a\nb.\n\n- one\n  item\n- two"))
    What it measures: a b.
    <BLANKLINE>
    - one item
    - two
    """
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        # a line continues the one before unless a blank line or a "- " item starts anew
        if out and out[-1] and stripped and not stripped.startswith("- "):
            out[-1] = f"{out[-1]} {stripped}"
        else:
            out.append(stripped)
    return "\n".join(out)


def _explain(args: argparse.Namespace) -> int:
    try:
        cls = find_rule(args.rule)
    except ValueError as error:
        topic = find_topic(args.rule)
        if topic is None:
            topics = ", ".join(t.slug for t in TOPICS)
            print(f"gradwatch: {error}; training-loop topics: {topics}", file=sys.stderr)
            return 2
        Console().print(f"[bold]{topic.slug}[/bold]: {topic.summary}\n")
        Console().print(reflow(topic.explanation), markup=False, highlight=False)
        return 0
    console = Console()
    console.print(f"[bold]{cls.code} {cls.slug}[/bold] ({cls.severity}): {cls.summary}\n")
    console.print(reflow(cls.explanation), markup=False, highlight=False)
    if cls.defaults:
        console.print("\n[bold]Thresholds[/bold] (override with thresholds={...} in watch()):")
        for name, value in cls.defaults.items():
            doc = cls.threshold_docs.get(name, "")
            console.print(f"  {name} = {value:g}  {doc}", markup=False, highlight=False)
    console.print(
        f"\nPersistence: announced after {cls.window} monitored step(s); resolved after "
        f"{cls.clear_after} clear step(s); repeated after {cls.cooldown} if it persists.",
        highlight=False,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return int(demo_main(args) or 0)


def _report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return int(report_main(args) or 0)


def _run(args: argparse.Namespace) -> int:
    from .run import main as run_main

    return int(run_main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Watch a PyTorch model while it trains and say where the gradient stops.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    rules = sub.add_parser("rules", help="list the built-in rules")
    rules.add_argument(
        "--json",
        action="store_true",
        help="print every rule as JSON: code, slug, severity, summary, explanation, thresholds",
    )
    rules.set_defaults(func=_rules)

    explain = sub.add_parser("explain", help="what a rule measures, why, and how to fix it")
    explain.add_argument("rule", help="a code (GW101) or slug (vanishing-gradient)")
    explain.set_defaults(func=_explain)

    demo = sub.add_parser(
        "demo",
        help="train deep sigmoid, ReLU and residual networks on digits and show the findings",
        description="The classic deep sigmoid vs ReLU vs residual experiment: trains six "
        "small networks on scikit-learn's bundled digits (nothing is downloaded) and shows "
        "what gradwatch finds in each. Needs the 'demo' extra (scikit-learn).",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="summarise a recorded run (a JSONL file)")
    add_report_arguments(report)
    report.set_defaults(func=_report)

    run = sub.add_parser(
        "run",
        help="run a training script unchanged, with gradwatch attached",
        description="Runs SCRIPT as __main__ with its arguments, as python would, and watches "
        "every model it trains: a Lightning or Transformers Trainer gets gradwatch's "
        "callback, any other optimizer.step() is seen by an optimizer hook. Options go "
        "before the script; everything after it is the script's. Exit code: the script's.",
    )
    add_run_arguments(run)
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
