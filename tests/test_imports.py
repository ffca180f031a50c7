"""The command line answers without torch; the package's names load on first use."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

import gradwatch

# Runs in a fresh interpreter: what does each command import?
_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from gradwatch.cli import main
    results = {}
    for argv in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass  # --help
        results[" ".join(argv)] = sorted(m for m in ("torch", "numpy") if m in sys.modules)
    print(json.dumps(results))
    """
)


def _heavy_imports(*commands: list[str]) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_rules_and_explain_do_not_import_torch():
    """Every rule's metadata must stay importable without torch: a rule module that
    imports torch (or gradwatch.layers) at the top makes every command pay ~1 s and, on
    an install without NumPy, print torch's NumPy warning. Use gradwatch.kinds."""
    commands = [["--help"], ["rules"], ["explain", "GW101"], ["demo", "--help"]]
    commands += [["explain", cls.code] for cls in gradwatch.rules.BUILTIN_RULES]
    imported = _heavy_imports(*commands)
    assert imported == {" ".join(c): [] for c in commands}


def test_reading_a_record_does_not_import_torch(tmp_path):
    path = tmp_path / "run.jsonl"
    finding = gradwatch.Finding("GW104", "no-gradient", "warning", 3, ("fc",), "m", "h")
    stats = gradwatch.StepStats(step=3, layers={}, global_grad_norm=1.0)
    recorder = gradwatch.JsonlRecorder(path)
    recorder.report(stats, [finding])
    recorder.close([])
    assert _heavy_imports(["report", str(path)]) == {f"report {path}": []}


@pytest.mark.parametrize("name", gradwatch.__all__)
def test_every_public_name_imports_from_the_package(name):
    namespace: dict = {}
    exec(f"from gradwatch import {name}", namespace)
    assert namespace[name] is getattr(gradwatch, name)
    assert name in dir(gradwatch)


def test_public_names_are_the_defining_modules_objects():
    assert gradwatch.watch is importlib.import_module("gradwatch.watcher").watch
    assert gradwatch.Finding is importlib.import_module("gradwatch.findings").Finding
    assert gradwatch.default_reporters is importlib.import_module(
        "gradwatch.reporters.defaults"
    ).default_reporters
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        gradwatch.nothing_here  # noqa: B018


def test_kinds_stay_importable_from_layers():
    from gradwatch import kinds, layers

    for name in kinds.__all__:
        assert getattr(layers, name) is getattr(kinds, name)


def test_submodules_are_reachable_as_attributes_as_before():
    code = (
        "import gradwatch; gradwatch.rules.builtin_rules(); gradwatch.reporters.TerminalReporter; "
        "gradwatch.layers.module_kind"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
