"""``docs/options.md``: every option of :func:`gradwatch.watch`, of ``Watcher.step()``
and of the Lightning and Transformers callbacks, in one table.

The names, defaults and which function takes which option come from the signatures
(``inspect.signature``), so an option added to one of them appears when the file is
written again. What each option does is said here in plain words (:data:`OPTION_TEXT`);
an option without a line here takes the first paragraph of its docstring entry, and one
with neither is an error that names it.

The callbacks live in ``gradwatch.integrations`` and need their frameworks: writing this
file needs the ``dev`` extra (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: What each option does, for people who have not read the code. Words of the
#: implementation stay out: say what happens, not what the part is called.
OPTION_TEXT: dict[str, str] = {
    "every_n_steps": "Measure every n-th step: at 15, three measured steps (and so a finding) "
    "within 45 steps. Nothing is hooked on the steps in between, so they cost almost "
    "nothing. The callbacks also measure each step at which the framework writes its logs.",
    "rules": "Your own list of rules instead of the built-in ones, e.g. "
    "`[*gradwatch.builtin_rules(), MyRule()]`.",
    "select": "Run only these rules: codes, code prefixes or slugs (`[\"GW1\"]`: every "
    "gradient rule). One string is one item.",
    "ignore": "Leave out these rules, by code, prefix or slug (`[\"dead-units\"]`).",
    "thresholds": "Change a built-in rule's thresholds: `{\"GW101\": {\"ratio\": 1e-3}}` "
    "(the [rules reference](rules.md) lists each rule's thresholds and what they accept).",
    "reporters": "Where findings go. Default: the terminal and Python `logging` (the "
    "callbacks add W&B alerts when the run logs to W&B). A list replaces the defaults: "
    "`[*gradwatch.default_reporters(), gradwatch.JsonlRecorder(\"run.jsonl\")]` keeps "
    "them and adds a record; `[]`: none (findings are still returned and kept).",
    "layers": "Watch only these modules: names or glob patterns as `model.named_modules()` "
    "gives them (`[\"encoder.*\"]`).",
    "exclude": "Leave out these modules: names or glob patterns.",
    "optimizer": "Your optimizer (the instance, not the class). The rules then judge "
    "gradients as it uses them: Adam rescales them, SGD's learning rate sizes the step. "
    "The callbacks find the trainer's optimizer themselves.",
    "history": "How many measured steps are kept in `watcher.history`.",
    "detail_every": "How often the costlier numbers are measured (the size of each "
    "layer's output and of the gradient flowing back into it, parameter norms, the "
    "largest gradient, the share of zeros): at the first three measured steps, then at "
    "least this many steps apart.",
    "activations": "`False`: measure gradients only, with no hook on the forward pass. "
    "Dead ReLU units are still found from the gradients; saturation and attention are "
    "not measured.",
    "sync": "Combine the numbers of all processes in distributed training (DDP, FSDP2). "
    "Default (`None`): when more than one process is running. Call `step()` in every "
    "process.",
    "deferred": "Read the measured numbers one measured step later, so that a GPU never "
    "waits for them (findings then come one measured step late). Default `\"auto\"`: "
    "on CUDA.",
    "scaler": "The `torch.amp.GradScaler` of fp16 training. Numbers are then those of the "
    "real (unscaled) gradients, and a step the scaler skips while it adjusts its scale "
    "is not reported as NaN. The callbacks find the trainer's scaler themselves.",
    "sentinel": "Also check a small sample of the gradients (and the loss, when given to "
    "`step()`) at every step, and measure the whole model at once at the first NaN/Inf "
    "or sudden jump instead of at the next measured step (about 0.2% of a step). "
    "`False`: measure only every `every_n_steps`.",
    "stop_on": "Stop training when a finding matches: a severity (`\"error\"`: errors), "
    "codes, prefixes or slugs (`[\"GW103\"]`), or a list mixing them. "
    "`callback.stop_reason` says why.",
    "log_stats": "Per-layer numbers added to the framework's logged metrics "
    "(`gradwatch/grad_norm/<layer>`, ...): `True`: gradient norm and RMS, and the "
    "active/saturated share of ReLU and sigmoid/tanh layers; a list of names to choose; "
    "`False`: none (findings are still reported).",
    "log_layers": "At most this many layers get per-layer metrics (spread evenly in "
    "depth, first and last included); `None`: every layer.",
    "step": "The step number findings carry (e.g. a trainer's global step). Default: "
    "`step()` calls are counted from 0.",
    "loss": "This step's loss (a tensor or a number): a NaN/Inf loss, or a loss far above "
    "its recent level, is caught at the step it happens.",
}

#: The callbacks documented next to ``watch()``: (column title, module, class name).
CALLBACKS: tuple[tuple[str, str, str], ...] = (
    ("Lightning", "gradwatch.integrations.lightning", "GradWatchCallback"),
    ("Transformers", "gradwatch.integrations.transformers", "GradWatchCallback"),
)

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


@dataclass(frozen=True)
class Option:
    """One keyword argument of one function: its name and default (``EMPTY``: none)."""

    name: str
    default: Any


EMPTY = inspect.Parameter.empty


def keyword_options(func: Callable[..., Any], skip: Sequence[str] = ()) -> list[Option]:
    """The named parameters of ``func`` (not ``self``, ``*args`` or ``**kwargs``).

    >>> def f(self, model, *, every_n_steps=15, **rest): ...
    >>> keyword_options(f, skip=["model"])
    [Option(name='every_n_steps', default=15)]
    """
    options = []
    for parameter in inspect.signature(func).parameters.values():
        if parameter.name == "self" or parameter.name in skip:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        options.append(Option(parameter.name, parameter.default))
    return options


def watch_options() -> list[Option]:
    """The options of :func:`gradwatch.watch`: its own keywords, or the ``Watcher``'s
    where it passes ``**options`` through."""
    from ..watcher import Watcher, watch

    own = inspect.signature(watch).parameters.values()
    source = Watcher.__init__ if any(p.kind is p.VAR_KEYWORD for p in own) else watch
    return keyword_options(source, skip=["module"])


def step_options() -> list[Option]:
    """The keywords of ``Watcher.step()``."""
    from ..watcher import Watcher

    return keyword_options(Watcher.step)


def callback_classes() -> list[tuple[str, type]]:
    """The callback classes (importing their frameworks)."""
    found = []
    for title, module, name in CALLBACKS:
        try:
            found.append((title, getattr(importlib.import_module(module), name)))
        except ImportError as error:
            raise ImportError(
                f"writing docs/options.md needs {module} ({error}); install the dev extra: "
                'pip install -e ".[dev]"'
            ) from None
    return found


def docstring_options(doc: str | None) -> dict[str, str]:
    """Option texts found in a docstring: ``- ``name``: text`` items, or the
    ``name, other: text`` entries of an ``Args:`` section (first paragraph each).

    >>> doc = '''Args:
    ...     a, b: the first
    ...         two.
    ...     c: the third.
    ... '''
    >>> docstring_options(doc)
    {'a': 'the first two.', 'b': 'the first two.', 'c': 'the third.'}
    """
    found: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    entry = re.compile(r"^(?:- )?(?P<names>``\w+``(?:, ``\w+``)*|\w+(?:, \w+)*): (?P<text>.*)")
    names: list[str] = []
    indent = -1
    for line in lines:
        stripped = line.strip()
        here = len(line) - len(line.lstrip())
        match = entry.match(stripped)
        if match and (indent < 0 or here <= indent):
            names = [n.strip("` ") for n in match["names"].split(",")]
            indent = here
            for name in names:
                found[name] = match["text"]
        elif names and stripped and here > indent:
            for name in names:
                found[name] += " " + stripped
        else:
            names, indent = [], -1
    return {name: _ROLE.sub(r"`\1`", text.replace("``", "`")) for name, text in found.items()}


def _default_text(option: Option | None) -> str:
    if option is None:
        return "—"
    if option.default is EMPTY:
        return "required"
    return f"`{option.default!r}`"


def option_text(name: str, docs: Sequence[str | None]) -> str:
    """What ``name`` does: :data:`OPTION_TEXT`, else the first docstring that has it."""
    if name in OPTION_TEXT:
        return OPTION_TEXT[name]
    for doc in docs:
        text = docstring_options(doc).get(name)
        if text:
            return text
    raise ValueError(
        f"option {name!r} has no description: add it to OPTION_TEXT in "
        "gradwatch/docs/options.py (or to its function's docstring)"
    )


def _row(name: str, cells: Sequence[str], docs: Sequence[str | None]) -> str:
    return f"| `{name}` | " + " | ".join(cells) + f" | {option_text(name, docs)} |"


def _callback_cell(
    name: str, watch: Mapping[str, Option], callbacks: Sequence[tuple[str, Mapping[str, Option]]]
) -> str:
    """One cell for all callbacks: their default, "as `watch()`" where ``None`` means
    watch()'s default, or which callbacks take the option."""
    cells = []
    for _, options in callbacks:
        option = options.get(name)
        defers = option is not None and option.default is None and name in watch
        if defers and watch[name].default is not None:
            cells.append("as `watch()`")
            continue
        cells.append(_default_text(option))
    if len(set(cells)) == 1:
        return cells[0]
    return ", ".join(f"{title}: {cell}" for (title, _), cell in zip(callbacks, cells))


def options_reference() -> str:
    """``docs/options.md``."""
    from ..watcher import Watcher, watch

    watch_opts = {o.name: o for o in watch_options()}
    callbacks = [(title, {o.name: o for o in keyword_options(cls.__init__)}) for title, cls in
                 callback_classes()]
    docs = [watch.__doc__, Watcher.__doc__, Watcher.__init__.__doc__] + [
        cls.__doc__ for _, cls in callback_classes()
    ]
    names = list(watch_opts)
    for _, options in callbacks:
        names += [name for name in options if name not in names]
    titles = " and ".join(title for title, _ in callbacks)
    lines = [
        "# Options",
        "",
        "<!-- Written by `python -m gradwatch.docs --write` from the signatures; "
        "do not edit by hand. -->",
        "",
        "Every option is a keyword argument, checked when the watcher (or callback) is "
        "built: a wrong value is a `ValueError` that names the option and what it "
        f"accepts. The callbacks ({titles}, see [integrations](integrations.md)) take the "
        "options of `watch()` that make sense under a trainer; \"as `watch()`\" means "
        "their default is `watch()`'s, \"—\" that they do not take it.",
        "",
        "| option | `watch()` default | callbacks' default | what it does |",
        "|---|---|---|---|",
    ]
    for name in names:
        lines.append(
            _row(
                name,
                [_default_text(watch_opts.get(name)), _callback_cell(name, watch_opts, callbacks)],
                docs,
            )
        )
    lines += [
        "",
        "## `watcher.step()`",
        "",
        "Call it once per optimizer step, after `loss.backward()` and before "
        "`optimizer.step()`; it returns the findings new at this step.",
        "",
        "| argument | default | what it does |",
        "|---|---|---|",
    ]
    for option in step_options():
        lines.append(
            _row(option.name, [_default_text(option)], [Watcher.step.__doc__, Watcher.__doc__])
        )
    return "\n".join(lines) + "\n"
