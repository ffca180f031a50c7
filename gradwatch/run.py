"""``gradwatch run [options] script.py [args...]``: run a training script unchanged, watched.
(``gradwatch run -m package.module [args...]`` runs a module, as ``python -m`` does.)

The script runs as ``__main__`` in this process (``runpy.run_path``), the way
``python -m cProfile script.py`` runs one: ``sys.argv`` is ``[script, args...]``,
``sys.path[0]`` the script's folder, ``__file__`` its absolute path (as ``python
script.py`` gives them). Its exit code is kept: ``sys.exit(n)`` gives n, an uncaught
exception prints its traceback (without gradwatch's frames) and gives 1.

What is attached (nothing is imported that the script does not import itself):

- a Lightning ``Trainer`` or a Transformers ``Trainer`` the script builds gets gradwatch's
  callback (measured after gradient accumulation, before clipping);
- any other ``optimizer.step()`` (plain PyTorch, Accelerate) is seen by a process-wide
  optimizer hook (:mod:`gradwatch.attach`), and the model that optimizer trains is watched.

Findings print as usual; when the script ends (normally, by ``sys.exit`` or by an
exception) every watcher is closed and prints its summary. Under ``torchrun`` (``torchrun
--nproc-per-node=2 -m gradwatch run train.py``) every rank measures, rank 0 reports.

>>> import gradwatch.cli
>>> gradwatch.cli.main(["run", "no-such-script.py"])  # says why on standard error
2
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a script runs, not for --help
    from torch import nn

    from .attach import Attachment
    from .findings import Finding
    from .reporters.base import Reporter
    from .watcher import Watcher


class StopTraining(BaseException):
    """Raised out of ``optimizer.step()`` when a finding matches ``--stop-on``. A
    ``BaseException``, like ``KeyboardInterrupt``: a script's ``except Exception`` around
    a step does not swallow it, and its ``finally`` blocks still run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradwatch run``; everything after the script goes to the script."""
    parser.add_argument("--every", type=int, metavar="N", help="measure every N-th step (15)")
    parser.add_argument(
        "--select",
        action="append",
        metavar="RULES",
        help="run only these rules: codes, code prefixes or slugs, comma-separated (GW1,GW201)",
    )
    parser.add_argument(
        "--ignore", action="append", metavar="RULES", help="skip these rules (dead-units)"
    )
    parser.add_argument(
        "--layers", action="append", metavar="PATTERN", help="watch only these modules (encoder.*)"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="leave these modules out"
    )
    parser.add_argument(
        "--stop-on",
        action="append",
        metavar="WHAT",
        help="stop the script when a finding matches: a severity (error) or rule codes/slugs; "
        "a plain loop ends with exit code 1, a Lightning/Transformers Trainer stops training",
    )
    parser.add_argument(
        "--record",
        metavar="FILE.jsonl",
        help="write a JSONL record (read it with gradwatch report); a second watched model "
        "writes FILE.<Model>.jsonl",
    )
    parser.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write per-layer statistics, findings and a gradient-flow figure for "
        "TensorBoard (a second watched model writes to DIR/<Model>)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="send statistics and alerts to the script's own W&B run (wandb.init in the "
        "script; Lightning's WandbLogger and report_to='wandb' get alerts without this)",
    )
    parser.add_argument(
        "-m",
        dest="module",
        action="store_true",
        help="SCRIPT is a module name, run as python -m runs it (gradwatch run -m pkg.train)",
    )
    parser.add_argument("script", help="the training script, run as __main__")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="...", help="the script's own arguments"
    )


def _split(values: Sequence[str] | None) -> list[str] | None:
    """``["GW1,GW2", "dead-units"]`` -> ``["GW1", "GW2", "dead-units"]``."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


class RunOptions:
    """The command line, checked before the script starts (a wrong option is exit code 2,
    not an error an hour into training)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .rules import resolve_rules
        from .validation import whole_number

        self.script = args.script
        self.module = bool(getattr(args, "module", False))
        self.every = args.every
        whole_number("--every", self.every, allow_none=True)
        self.select = _split(args.select)
        self.ignore = _split(args.ignore)
        self.layers = _split(args.layers)
        self.exclude = _split(args.exclude)
        self.stop_on = _split(args.stop_on)
        self.record = args.record
        self.tensorboard = args.tensorboard
        self.wandb = bool(args.wandb)
        rules = resolve_rules(None, select=self.select, ignore=self.ignore)
        self.stop = None
        if self.stop_on:
            from gradwatch.integrations._callback import StopCondition

            self.stop = StopCondition.parse(self.stop_on, rules)
        if self.tensorboard:
            from gradwatch.integrations.tensorboard import require_tensorboard

            require_tensorboard()

    def watch_options(self) -> dict[str, Any]:
        """Options for :func:`gradwatch.watch` (only those given: its defaults otherwise)."""
        options: dict[str, Any] = {
            "select": self.select,
            "ignore": self.ignore,
            "layers": self.layers,
            "exclude": self.exclude,
        }
        if not every_rank_runs_gradwatch():
            # Processes the script starts itself run it without gradwatch: statistics
            # combined across ranks would wait for them forever. Each keeps its own.
            options["sync"] = False
        if self.every is not None:
            options["every_n_steps"] = self.every
        return options

    @property
    def extra_reporters(self) -> bool:
        return bool(self.record or self.tensorboard or self.wandb)

    def reporters(self, name: str, index: int) -> list[Reporter]:
        """The default reporters plus the requested ones, for the ``index``-th watched
        model (class ``name``): a second model gets files of its own."""
        from .reporters import JsonlRecorder, default_reporters

        reporters: list[Reporter] = list(default_reporters())
        if self.record:
            meta = {"model": name, "script": os.path.basename(self.script)}
            reporters.append(JsonlRecorder(numbered(self.record, index, name), meta=meta))
        if self.tensorboard:
            from gradwatch.integrations.tensorboard import TensorBoardReporter

            folder = self.tensorboard if index == 0 else os.path.join(self.tensorboard, name)
            reporters.append(TensorBoardReporter(folder))
        if self.wandb:
            from gradwatch.integrations.wandb import WandbReporter

            reporters.append(WandbReporter())
        return reporters


class ModelName:
    """A reporter that names the model above its findings when a script trains several
    (a GAN's generator and discriminator have layers with the same names)."""

    name = "model-name"

    def __init__(self, model: str, several: Callable[[], bool]) -> None:
        self.model = model
        self.several = several

    def report(self, stats: Any, findings: Sequence[Finding]) -> None:
        if self.several() and any(f.status != "resolved" for f in findings):
            print(f"gradwatch: in {self.model}:", file=sys.stderr, flush=True)


def numbered(path: str, index: int, name: str) -> str:
    """The file for the ``index``-th watched model: ``path`` itself for the first.

    >>> numbered("runs/x.jsonl", 0, "Generator"), numbered("runs/x.jsonl", 1, "Critic")
    ('runs/x.jsonl', 'runs/x.Critic.jsonl')
    """
    if index == 0:
        return path
    base, suffix = os.path.splitext(path)
    return f"{base}.{name}{suffix}"


def every_rank_runs_gradwatch() -> bool:
    """True when a launcher (``torchrun``, ``accelerate launch``) started this process as
    one rank of several, each running ``gradwatch run``. Otherwise any other process of
    the training is one the script starts itself (Lightning's ``strategy="ddp"`` from a
    plain ``python`` command, ``torch.multiprocessing.spawn``), without gradwatch."""
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Session:
    """One ``gradwatch run``: the optimizer hook, the Trainer patches, and the notices."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.stopped: str | None = None
        self._names: list[str] = []
        self.attachment: Attachment | None = None
        self._undo_trainers: Callable[[], None] | None = None

    def start(self) -> None:
        from .attach import Attachment

        self.attachment = Attachment(
            reporters=self._reporters,
            on_findings=self._check_stop if self.options.stop else None,
            on_watch=self._announce,
            **self.options.watch_options(),
        ).start()
        from gradwatch.integrations.trainers import add_callback_to_trainers

        self._undo_trainers = add_callback_to_trainers(self._callback_options)

    def close(self) -> None:
        if self._undo_trainers is not None:
            self._undo_trainers()
        if self.attachment is None:
            return
        watchers = self.attachment.watchers
        for watcher in watchers:
            if len(watchers) > 1 and rank() == 0 and not watcher.closed:
                print(f"gradwatch: {type(watcher.module).__name__}", file=sys.stderr, flush=True)
            watcher.close()  # prints its summary
        self.attachment.close()

    def _reporters(self, model: nn.Module) -> list[Reporter]:
        if rank() != 0:
            return []
        from .layers import unwrap

        name = type(unwrap(model)).__name__
        self._names.append(name)
        # Which model a finding is about, once there are several (a GAN's two).
        label = ModelName(name, several=lambda: len(self._names) > 1)
        return [label, *self.options.reporters(name, len(self._names) - 1)]

    def _announce(self, watcher: Watcher, optimizer: Any) -> None:
        if rank() != 0:
            return
        layers = sum(1 for layer in watcher.layers if layer.params)
        print(
            f"gradwatch: watching {type(watcher.module).__name__} ({layers} layers with "
            f"parameters), trained by {type(optimizer).__name__}",
            file=sys.stderr,
            flush=True,
        )

    def _check_stop(self, watcher: Watcher, findings: Sequence[Finding]) -> None:
        stop = self.options.stop
        matched = stop.first_match(findings) if stop is not None else None
        if stop is None or matched is None:
            return
        self.stopped = stop.reason(matched.step, matched)
        raise StopTraining(self.stopped)

    def _callback_options(self, framework: str, name: str, processes: int) -> dict[str, Any] | None:
        """Options for a Trainer's gradwatch callback (its reporters when files are asked
        for); ``None`` when the Trainer will start processes that run without gradwatch."""
        options = self.options
        if processes > 1 and not every_rank_runs_gradwatch():
            from .guard import warn_user

            warn_user(
                f"gradwatch run: this {framework} Trainer trains in {processes} processes and "
                "starts the others itself, without gradwatch, so its callback is not added "
                "(its statistics are combined across ranks). Launch every process under "
                f"gradwatch: torchrun --nproc-per-node={processes} -m gradwatch run "
                f"{os.path.basename(self.options.script)} ... Until then only this process's "
                "optimizer steps are watched, with its own statistics."
            )
            return None
        if rank() == 0:
            print(
                f"gradwatch: watching the {framework} Trainer's model with GradWatchCallback",
                file=sys.stderr,
                flush=True,
            )
        out: dict[str, Any] = {
            "every_n_steps": options.every,
            "select": options.select,
            "ignore": options.ignore,
            "layers": options.layers,
            "exclude": options.exclude,
            "stop_on": options.stop_on,
        }
        if options.extra_reporters and rank() == 0:  # the other ranks report nothing
            self._names.append(name)
            out["reporters"] = options.reporters(name, len(self._names) - 1)
        return out


def _script_traceback(error: BaseException) -> Any:
    """The traceback from the script's own frames on: gradwatch's and runpy's are cut."""
    ours = {__name__, runpy.__name__}  # runpy's frames are "<frozen runpy>": go by module
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in ours:
        tb = tb.tb_next
    return tb if tb is not None else error.__traceback__


def _run_main(options: RunOptions, args: Sequence[str]) -> None:
    """Run the script (or module) as ``__main__``, with ``sys.argv`` and ``sys.path[0]``
    as ``python script.py`` (``python -m module``) sets them."""
    if options.module:
        sys.argv = [options.script, *args]  # runpy puts the module's file in argv[0]
        sys.path[0] = os.getcwd()
        runpy.run_module(options.script, run_name="__main__", alter_sys=True)
        return
    path = os.path.abspath(options.script)
    sys.argv = [path, *args]
    # The script's folder (symbolic links resolved) first, as Python does.
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    runpy.run_path(path, run_name="__main__")


def run_script(options: RunOptions, args: Sequence[str]) -> int:
    """Run the script as ``__main__`` with gradwatch attached; its exit code."""
    session = _Session(options)
    session.start()
    try:
        _run_main(options, args)
    except SystemExit:
        session.close()
        raise  # its code, or its message, as Python itself handles them
    except StopTraining:
        session.close()
        print(session.stopped, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        session.close()
        raise
    except BaseException as error:
        session.close()
        # Python prints the exception's own traceback: cut gradwatch's frames from it.
        error = error.with_traceback(_script_traceback(error))
        sys.excepthook(type(error), error, error.__traceback__)
        return 1
    session.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``gradwatch run`` (wired in :mod:`gradwatch.cli`)."""
    script = Path(args.script)
    if not getattr(args, "module", False) and not script.exists():
        print(
            f"gradwatch run: can't open file {args.script!r}: No such file or directory",
            file=sys.stderr,
        )
        return 2
    try:
        options = RunOptions(args)
    except (ValueError, ModuleNotFoundError) as error:
        print(f"gradwatch run: {error}", file=sys.stderr)
        return 2
    return run_script(options, args.args)


__all__ = ["RunOptions", "StopTraining", "add_arguments", "main", "run_script"]
