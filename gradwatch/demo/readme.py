"""The README's demo blocks, written from a real run of the demo.

The README shows what ``gradwatch demo`` prints: a finding's panel at the top, the
results table, and where those numbers were measured. Each block sits between
``<!-- gradwatch-demo:NAME -->`` and ``<!-- /gradwatch-demo:NAME -->`` and is produced
here, from a run, never typed by hand. After a change to the rules' wording or to the
demo, rewrite them with::

    python -m gradwatch.demo.readme --write     # trains the demo (~20 s), rewrites README.md
    python -m gradwatch.demo.readme --check     # exit 1 and show the difference if they drifted

and the test suite (``tests/test_demo.py``) fails while they differ from real output.

Which numbers repeat where: the demo trains on one thread, so on one machine a run
repeats bit for bit. Another CPU or BLAS build rounds sums differently and training
amplifies that, so its losses, accuracies and ratios differ; the findings do not. The
``measured`` block names the machine, so a check on another machine compares the
findings and leaves the numbers alone.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import io
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from ..reporters.terminal import finding_panel
from .options import DEFAULT_SEED
from .table import results_text

if TYPE_CHECKING:
    from .command import DemoResult

#: The blocks, in the order they appear in the README.
BLOCKS = ("hero", "measured", "results")
#: The panel is drawn for the narrowest terminal gradwatch draws for.
HERO_WIDTH = 80
#: Blocks of generated output in the README are marked ``<!-- gradwatch-KIND:NAME -->`` ...
#: ``<!-- /gradwatch-KIND:NAME -->``: ``demo`` here, ``bench`` for benchmarks/overhead.py.
DEMO = "demo"


@functools.cache
def _block_pattern(kind: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?P<start><!-- gradwatch-{kind}:(?P<name>[a-z]+) -->\n)(?P<body>.*?)"
        rf"(?P<end><!-- /gradwatch-{kind}:(?P=name) -->)",
        re.DOTALL,
    )


def machine() -> str:
    """What decides the demo's numbers to the last bit: torch's build, the CPU
    architecture and vector extension torch dispatches to, and the CPU model."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {platform.machine()} {capability}, {_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hero_panel(result: DemoResult) -> str:
    """The panel the terminal showed for the demo's first problem: the first warning or
    error of the first network that had one, with the chart it was drawn with."""
    for run in result.runs:
        for finding in run.problems:
            stats = run.finding_stats.get(finding.step)
            console = Console(
                file=io.StringIO(), width=HERO_WIDTH, color_system=None, force_terminal=False
            )
            console.print(finding_panel(finding, stats))
            return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())
    raise ValueError("no network of this demo run had a warning or an error")


def render(result: DemoResult, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """The README blocks for a demo run (Markdown)."""
    return {
        "hero": f"```\n{hero_panel(result)}\n```\n",
        "measured": f"Measured with seed {seed} on one thread: {machine()}.\n",
        "results": f"```\n{results_text(result.runs)}\n```\n",
    }


def read_blocks(text: str, kind: str = DEMO) -> dict[str, str]:
    """The generated blocks of this ``kind`` found in a README's text, by name."""
    return {match["name"]: match["body"] for match in _block_pattern(kind).finditer(text)}


def replace_blocks(text: str, blocks: Mapping[str, str], kind: str = DEMO) -> str:
    """``text`` with each block's body replaced; a block missing from it is an error."""
    missing = [name for name in blocks if name not in read_blocks(text, kind)]
    if missing:
        raise ValueError(
            f"the README has no block(s) {', '.join(missing)}; mark each with "
            f"<!-- gradwatch-{kind}:NAME --> and <!-- /gradwatch-{kind}:NAME --> lines"
        )

    def body(match: re.Match[str]) -> str:
        new = blocks.get(match["name"], match["body"])
        return match["start"] + new + match["end"]

    return _block_pattern(kind).sub(body, text)


def table_columns(block: str, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Some columns of a results block, one tuple per network: the columns are read by
    position under the header's dashes, so cells may contain spaces.

    >>> block = "```\\nt\\nmodel  findings\\n-----  -----------\\nnet    GW101 error\\n```\\n"
    >>> table_columns(block, ["findings"])
    [('GW101 error',)]
    """
    lines = [line for line in block.splitlines() if not line.startswith("```")]
    rule = next(i for i, line in enumerate(lines) if line.startswith("-") and "  " in line)
    spans = [match.span() for match in re.finditer(r"-+", lines[rule])]
    header = [lines[rule - 1][a:b].strip() for a, b in spans]
    wanted = [header.index(column) for column in columns]
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans]
        rows.append(tuple(cells[i] for i in wanted))
    return rows


def _run_demo(seed: int) -> DemoResult:
    from .command import run_demo

    print("training the demo's networks (about 20 s) ...", file=sys.stderr)
    quiet = io.StringIO()
    with redirect_stderr(quiet):  # the findings as they happen: the blocks show them
        return run_demo(seed=seed, console=Console(file=quiet))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradwatch.demo.readme",
        description="Rewrite (--write) or check (--check) the README's demo blocks from a "
        "real run of gradwatch demo.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    action.add_argument("--check", action="store_true", help="exit 1 if the blocks differ")
    parser.add_argument("readme", nargs="?", default="README.md", help="default: README.md")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    new = replace_blocks(text, render(_run_demo(DEFAULT_SEED)))
    if args.write:
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: demo blocks {'rewritten' if new != text else 'already up to date'}")
        return 0
    if new == text:
        print(f"{path}: demo blocks match the demo's output")
        return 0
    diff = difflib.unified_diff(
        text.splitlines(), new.splitlines(), f"{path} (now)", "demo output", lineterm=""
    )
    print("\n".join(diff))
    print(f"{path}: demo blocks differ; rewrite them with: python -m gradwatch.demo.readme --write")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
