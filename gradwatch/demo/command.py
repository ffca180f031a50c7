"""``gradwatch demo``: train the networks, print findings as they come, then the table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..reporters.base import Reporter
from ..reporters.jsonl import JsonlRecorder
from ..reporters.terminal import TerminalReporter
from .data import Digits, load_digits
from .extras import MissingExtra
from .figure import check_image_path, gradient_flow_figure, save_figure, write_error
from .nets import NETS, DemoNet, get_net, net_names
from .options import DEFAULT_SEED, DEFAULT_STEPS, MIN_STEPS_FOR_FINDINGS
from .run import CLIP_NORM, MOMENTUM, NetRun, one_thread, train_net
from .table import print_results

__all__ = ["DemoResult", "main", "run_demo", "select_nets"]


@dataclass
class DemoResult:
    """What :func:`run_demo` did: one :class:`NetRun` per network, the figure (when
    ``png`` was given) and the record files (when ``record`` was given)."""

    runs: list[NetRun]
    figure: Any | None = None
    records: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def as_expected(self) -> bool:
        return all(run.as_expected for run in self.runs)


def select_nets(only: Iterable[str] | None) -> list[DemoNet]:
    """The networks named in ``only`` (names, or comma-separated lists of names), in demo
    order; all of them when ``only`` is empty. Unknown names raise a ValueError that
    lists the valid ones.

    >>> [net.name for net in select_nets(["leaky-high-lr,sigmoid"])]
    ['sigmoid', 'leaky-high-lr']
    """
    wanted = [part.strip() for item in (only or ()) for part in item.split(",") if part.strip()]
    if not wanted:
        return list(NETS)
    unknown = [name for name in wanted if name not in net_names()]
    if unknown:
        raise ValueError(
            f"unknown network(s) {', '.join(repr(n) for n in unknown)}; "
            f"valid names: {', '.join(net_names())}"
        )
    return [get_net(name) for name in net_names() if name in wanted]


def run_demo(
    only: Iterable[str] | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    png: str | Path | None = None,
    record: str | Path | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Train the selected networks, print findings as they come and the results table.

    Raises ValueError for an unknown network name, :class:`MissingExtra` when
    scikit-learn (or, with ``png``, matplotlib) is not installed, OSError when ``record``
    or ``png`` cannot be written.
    """
    nets = select_nets(only)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    console = console or Console()
    with one_thread():  # the same bits whatever the caller's thread count
        return _run(nets, steps, seed, png, record, console)


def _run(
    nets: Sequence[DemoNet],
    steps: int,
    seed: int,
    png: str | Path | None,
    record: str | Path | None,
    console: Console,
) -> DemoResult:
    started = time.perf_counter()
    if png is not None:
        check_image_path(png)  # fail before training, not after it
    record_dir = Path(record) if record is not None else None
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    _say(
        console,
        f"gradwatch demo: {len(nets)} network(s) on scikit-learn's digits "
        f"({len(data.x_train)} training, {len(data.x_test)} held-out images), {steps} steps "
        f"each; SGD (momentum {MOMENTUM}, gradients clipped to norm {CLIP_NORM:g}), seed {seed}",
    )
    if steps < MIN_STEPS_FOR_FINDINGS:
        _say(
            console,
            f"note: with {steps} steps there are too few monitored steps (one every 15, "
            f"three in a row) for any finding; use --steps {MIN_STEPS_FOR_FINDINGS} or more.",
            style="yellow",
        )
    runs, records = _train_all(nets, data, steps, seed, record_dir, console)
    console.print()
    print_results(console, runs)
    _print_lessons(console, runs)
    figure = None
    if png is not None:
        figure = gradient_flow_figure(runs)
        save_figure(figure, png)
        _say(console, f"gradient-flow figure: {png}")
    if records:
        _say(console, f"records: {record_dir} (read one with: gradwatch report {records[0]})")
    seconds = time.perf_counter() - started
    _say(console, f"done in {seconds:.1f} s", style="dim")
    return DemoResult(runs=runs, figure=figure, records=records, seconds=seconds)


def _train_all(
    nets: Sequence[DemoNet],
    data: Digits,
    steps: int,
    seed: int,
    record_dir: Path | None,
    console: Console,
) -> tuple[list[NetRun], list[Path]]:
    """Train each network in turn. In a terminal a progress bar runs at the bottom while
    findings print above it (rich's Live display redirects the standard error that the
    terminal reporter writes to); elsewhere one plain line per network."""
    terminal = console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not terminal,
    )
    runs: list[NetRun] = []
    records: list[Path] = []
    with progress:
        for number, net in enumerate(nets, start=1):
            heading = f"[{number}/{len(nets)}] {net.name}: {net.label} (SGD lr {net.lr:g})"
            if terminal:
                console.rule(Text(heading, style="bold"), align="left")
            else:
                _say(console, heading)
            # Findings as users see them (on standard error, which the progress display
            # redirects above itself); the results table replaces the end-of-run summary.
            reporters: list[Reporter] = [TerminalReporter(summary=False)]
            if record_dir is not None:
                path = record_dir / f"{net.name}.jsonl"
                path.unlink(missing_ok=True)  # the recorder appends: keep one run per file
                reporters.append(JsonlRecorder(path, meta=_meta(net, steps, seed)))
                records.append(path)
            task = progress.add_task(net.name, total=steps)
            run = train_net(
                net,
                data,
                steps=steps,
                seed=seed,
                reporters=reporters,
                on_step=lambda _step, task=task: progress.advance(task),
            )
            runs.append(run)
            verdict = ", ".join(sorted({f.code for f in run.problems})) or "no findings"
            progress.update(task, description=f"{net.name}: {verdict}")
            if not terminal:
                _say(console, f"  {steps} steps in {run.seconds:.1f} s: {verdict}")
    return runs, records


def _say(console: Console, text: str, style: str | None = None) -> None:
    """A line of text, no markup: wrapped at words in a terminal, never elsewhere (logs)."""
    console.print(
        text, style=style, markup=False, highlight=False, soft_wrap=not console.is_terminal
    )


def _meta(net: DemoNet, steps: int, seed: int) -> dict[str, Any]:
    return {
        "source": "gradwatch demo",
        "model": net.name,
        "label": net.label,
        "lr": net.lr,
        "momentum": MOMENTUM,
        "clip_norm": CLIP_NORM,
        "steps": steps,
        "seed": seed,
    }


def _print_lessons(console: Console, runs: Sequence[NetRun]) -> None:
    for run in runs:
        _say(console, f"  {run.net.name} ({run.net.label}): {run.net.lesson}")
    surprises = [run for run in runs if not run.as_expected]
    if not surprises:
        flagged = [r.net.name for r in runs if r.net.expect_findings]
        clean = [r.net.name for r in runs if not r.net.expect_findings]
        parts = []
        if flagged:
            parts.append(f"findings for {', '.join(flagged)}")
        if clean:
            parts.append(f"none for {', '.join(clean)}")
        _say(
            console,
            f"As the classic experiment (deep sigmoid vs ReLU vs residual) predicts: "
            f"{'; '.join(parts)}.",
            style="green",
        )
        return
    for run in surprises:
        if run.net.expect_findings:
            text = f"Unexpected: no warning or error for {run.net.name}"
        else:
            codes = ", ".join(sorted({f.code for f in run.problems}))
            text = f"Unexpected: {run.net.name} got {codes}"
        if run.steps < MIN_STEPS_FOR_FINDINGS:
            text += f" (only {run.steps} steps)"
        _say(console, text, style="yellow")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``gradwatch demo`` (wired in :mod:`gradwatch.cli`)."""
    png = getattr(args, "png", None)
    record = getattr(args, "record", None)
    try:
        nets = select_nets(getattr(args, "only", None))
        if png is not None:
            check_image_path(png)  # before any training
        run_demo(
            [net.name for net in nets],
            steps=getattr(args, "steps", DEFAULT_STEPS),
            seed=getattr(args, "seed", DEFAULT_SEED),
            png=png,
            record=record,
        )
    except (ValueError, MissingExtra) as error:
        print(f"gradwatch demo: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"gradwatch demo: {write_error(error)}", file=sys.stderr)
        return 2
    return 0

