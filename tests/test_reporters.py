"""Terminal, logging and JSONL reporting."""

import io
import json
import logging
import math
import sys

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import JsonlRecorder, LoggingReporter, TerminalReporter, read_record
from gradwatch.reporters.chart import gradient_flow_text

from .support import mlp, train


@pytest.fixture(scope="module")
def sick_run(tmp_path_factory):
    """A deep sigmoid MLP (vanishing from the start), watched with every reporter."""
    path = tmp_path_factory.mktemp("run") / "run.jsonl"
    plain = io.StringIO()
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("gradwatch.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    model = mlp(30, nn.Sigmoid)
    watcher = gradwatch.watch(
        model,
        every_n_steps=10,
        reporters=[
            TerminalReporter(file=plain),
            LoggingReporter(logger=logger),
            JsonlRecorder(path, meta={"model": "sigmoid-30"}),
        ],
    )
    train(model, watcher, steps=40, lr=0.1)
    watcher.close()
    logger.removeHandler(handler)
    return watcher, plain.getvalue(), records, path


def test_plain_terminal_output_has_code_layers_evidence_fix_and_chart(sick_run):
    _, text, _, _ = sick_run
    assert "gradwatch ERROR GW101 vanishing-gradient at step 20" in text
    assert "layers: 0 (Linear), 2 (Linear), 4 (Linear)" in text
    assert "evidence: ratio=" in text
    assert "fix: " in text
    assert "gradient flow at step 20" in text
    # the chart marks starved layers and draws the last layer's bar full
    chart_lines = [line for line in text.splitlines() if line.startswith((" !", "  "))]
    assert any(line.startswith(" !0 ") for line in chart_lines)
    assert "\x1b[" not in text  # no colour codes when the output is not a terminal
    assert "gradwatch summary:" in text and "GW101 vanishing-gradient [error]" in text


def test_rich_panel_when_forced():
    model = mlp(30, nn.Sigmoid)
    out = io.StringIO()
    watcher = gradwatch.watch(
        model, every_n_steps=10, reporters=[TerminalReporter(file=out, plain=False)]
    )
    train(model, watcher, steps=21, lr=0.1)
    watcher.close()
    text = out.getvalue()
    assert "GW101 vanishing-gradient · error · step 20" in text
    assert "█" in text  # the gradient-flow bars
    assert "gradwatch summary" in text


def test_findings_go_to_logging_at_their_severity(sick_run):
    _, _, records, _ = sick_run
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert errors and errors[0].getMessage().startswith("GW101 vanishing-gradient at step 20")
    assert errors[0].gradwatch_finding["code"] == "GW101"
    assert records[-1].levelno == logging.INFO and "closed" in records[-1].getMessage()


def test_jsonl_record_round_trip(sick_run):
    watcher, _, _, path = sick_run
    record = read_record(path)
    assert record.meta == {"model": "sigmoid-30"}
    assert [s.step for s in record.steps] == [0, 10, 20, 30]
    assert [f.code for f in record.findings] == [f.code for f in watcher.findings]
    first = record.steps[0].layers["0"]
    assert first.grad_norm == watcher.history[0].layers["0"].grad_norm
    assert record.summary[0].code == "GW101"
    assert not record.truncated


def test_jsonl_reader_tolerates_a_truncated_last_line(sick_run, tmp_path):
    _, _, _, path = sick_run
    text = path.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[: len(text) - 40])  # a crash in the middle of the last line
    record = read_record(cut)
    assert record.truncated
    assert len(record.steps) == 4


def test_jsonl_reader_skips_and_counts_a_damaged_line_in_the_middle(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"type": "run", "meta": {"m": 1}}\nnot json\n{"type": "step", "step": "x"}\n'
        '{"type": "summary", "rows": []}\n'
    )
    record = read_record(bad)
    assert (record.meta, record.skipped_lines, record.truncated) == ({"m": 1}, 2, False)
    other = tmp_path / "other.txt"
    other.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):  # not a record at all
        read_record(other)


def _recorded_run(path, steps, meta):
    model = mlp(3)
    watcher = gradwatch.watch(
        model, every_n_steps=1, reporters=[JsonlRecorder(path, meta=meta)]
    )
    train(model, watcher, steps=steps)
    return watcher


def test_a_run_appended_after_a_crash_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "run.jsonl"
    crashed = _recorded_run(path, 4, {"attempt": 1})  # never closed: the process died
    text = path.read_text()
    path.write_text(text[: len(text) - 30])  # ... in the middle of writing its last line
    _recorded_run(path, 3, {"attempt": 2}).close()  # the resumed run, same file
    lines = path.read_text().splitlines()
    assert json.loads(lines[5])["meta"] == {"attempt": 2}  # below the cut line, not on it
    record = read_record(path)
    assert record.skipped_lines == 1 and not record.truncated
    assert [s.step for s in record.steps] == [0, 1, 2, 0, 1, 2]  # 3 + 3: only the cut one lost
    assert record.meta == {"attempt": 2}
    assert record.summary == []  # the resumed run closed cleanly, with no findings
    crashed.close()


def test_a_line_a_resumed_run_wrote_straight_after_a_cut_one_is_recovered(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(
        '{"type": "run", "meta": {"attempt": 1}}\n{"type": "step", "st'
        '{"type": "run", "meta": {"attempt": 2}}\n{"type": "summary", "rows": []}\n'
    )
    record = read_record(path)
    assert record.meta == {"attempt": 2} and record.skipped_lines == 1


def test_jsonl_lines_are_flushed_as_they_are_written(tmp_path):
    path = tmp_path / "live.jsonl"
    model = mlp(3)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[JsonlRecorder(path)])
    train(model, watcher, steps=3)
    lines = path.read_text().splitlines()  # read while the recorder is still open
    assert [json.loads(line)["type"] for line in lines] == ["run", "step", "step", "step"]
    watcher.close()


def test_non_finite_values_stay_valid_json(tmp_path):
    path = tmp_path / "nan.jsonl"
    model = mlp(3)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[JsonlRecorder(path)])
    model(torch.randn(4, 64)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    watcher.step()
    watcher.close()
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON: NaN is written as a string
    record = read_record(path)
    assert record.steps[0].layers["0"].grad_norm != record.steps[0].layers["0"].grad_norm


def test_output_goes_through_tqdm_write_while_a_bar_is_open(capsys):
    tqdm = pytest.importorskip("tqdm")
    written = []
    original = tqdm.tqdm.write

    def spy(text, file=None, **kw):  # records, then does the real thing
        written.append(text)
        return original(text, file=file, **kw)

    tqdm.tqdm.write = spy
    try:
        model = mlp(30, nn.Sigmoid)
        watcher = gradwatch.watch(model, every_n_steps=10, reporters=[TerminalReporter()])
        with tqdm.tqdm(total=21, file=sys.stderr) as bar:
            for _ in range(21):
                train(model, watcher, steps=1, lr=0.1)
                bar.update()
        watcher.close()
    finally:
        tqdm.tqdm.write = original
    assert any("GW101 vanishing-gradient" in text for text in written)
    err = capsys.readouterr().err
    header = next(line for line in err.splitlines() if "GW101 vanishing-gradient at step" in line)
    assert header.startswith("gradwatch ERROR")  # a whole line, not glued to the bar


def test_output_lands_above_a_rich_live_progress_bar():
    from rich.console import Console
    from rich.progress import Progress

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    model = mlp(30, nn.Sigmoid)
    watcher = gradwatch.watch(model, every_n_steps=10, reporters=[TerminalReporter(plain=True)])
    with Progress(console=console) as progress:  # redirects sys.stderr while live
        task = progress.add_task("training", total=21)
        for _ in range(21):
            train(model, watcher, steps=1, lr=0.1)
            progress.advance(task)
    watcher.close()
    text = screen.getvalue()
    assert "gradwatch ERROR GW101 vanishing-gradient at step 20" in text


def test_chart_text_thins_long_networks():
    model = mlp(30, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    train(model, watcher, steps=1)
    watcher.close()
    lines = gradient_flow_text(watcher.latest, max_layers=10).splitlines()
    assert len(lines) == 11
    assert lines[1].split()[0] == "0" and lines[-1].split()[0] == "58"


def test_min_severity_hides_lesser_findings():
    out = io.StringIO()
    reporter = TerminalReporter(file=out, min_severity="error")
    finding = gradwatch.Finding("GW104", "no-gradient", "warning", 3, ("a",), "m", "h")
    reporter.report(gradwatch.StepStats(step=3, layers={}, global_grad_norm=1.0), [finding])
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="severity"):
        TerminalReporter(min_severity="loud")


def _chart_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("gradient flow at step"))
    rows = []
    for line in lines[start + 1 :]:
        parts = line.lstrip(" !").split()
        if parts and parts[-1].startswith("Δw/w="):
            parts = parts[:-1]  # the update ratio, once it is measured
        if not line.startswith((" !", "  ")) or len(parts) not in (3, 4):
            break
        # "0 (Linear) 1.2e-05 ####": the layer's real name, the value, the bar
        rows.append([parts[0], *parts[-2:]])
    return rows


def test_a_deep_network_panel_shows_the_telling_rows_of_its_chart(sick_run):
    watcher, text, _, _ = sick_run
    rows = _chart_rows(text)
    assert 4 <= len(rows) <= 8, rows  # not one line per layer of the 30
    assert "8 of 30 layers" in text
    full = next(s for s in watcher.history if s.step == 20)  # the finding's step
    depth = [s.name for s in full.by_depth(with_gradient=True) if s.grad_rms is not None]
    names = [row[0] for row in rows]
    assert names[0] == depth[0] and names[-1] == depth[-1]  # the first and the last
    # The cliff: both sides of the steepest drop between neighbouring layers are shown.
    rms = {s.name: s.grad_rms for s in full.by_depth(with_gradient=True)}

    def log(value):
        return math.log10(value) if value > 0 else -400.0

    steepest = max(
        range(1, len(depth)), key=lambda i: abs(log(rms[depth[i]]) - log(rms[depth[i - 1]]))
    )
    assert depth[steepest - 1] in names and depth[steepest] in names
    assert names == sorted(names, key=depth.index)  # input side first


def test_chart_rows_none_draws_every_layer():
    model = mlp(30, nn.Sigmoid)
    out = io.StringIO()
    watcher = gradwatch.watch(
        model, every_n_steps=10, reporters=[TerminalReporter(file=out, chart_rows=None)]
    )
    train(model, watcher, steps=21, lr=0.1)
    watcher.close()
    assert len(_chart_rows(out.getvalue())) == 30
    with pytest.raises(ValueError, match="chart_rows"):
        TerminalReporter(chart_rows=1)


def test_the_rich_panel_is_as_short_as_the_plain_one():
    from rich.console import Console

    from gradwatch.reporters.terminal import finding_panel

    model = mlp(30, nn.Sigmoid)
    watcher = gradwatch.watch(model, every_n_steps=10, reporters=[])
    train(model, watcher, steps=21, lr=0.1)
    watcher.close()
    finding = next(f for f in watcher.findings if f.code == "GW101")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(finding_panel(finding, watcher.latest))
    panel = console.file.getvalue().splitlines()
    assert len(panel) < 30  # was ~45 with a row per layer
    assert sum("█" in line or "····" in line for line in panel) <= 8


def test_default_reporters_are_exported_and_adding_one_keeps_them(tmp_path):
    reporters = [*gradwatch.default_reporters(), JsonlRecorder(tmp_path / "r.jsonl")]
    assert [type(r) for r in reporters] == [TerminalReporter, LoggingReporter, JsonlRecorder]
    watcher = gradwatch.watch(nn.Linear(2, 2))  # reporters=None: the defaults
    assert [type(r) for r in watcher.reporters] == [TerminalReporter, LoggingReporter]
    watcher.close()


def test_reporter_modules_import_one_way():
    """No import cycle among the reporter modules (function-level imports included):
    the protocol does not know the reporters that implement it."""
    import ast
    from pathlib import Path

    package = Path(gradwatch.__file__).parent / "reporters"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        } - {""}
    graph["__init__"] = set()  # the package's face: it may import everything

    def reaches(start, goal, seen=()):
        return any(
            n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
            for n in graph.get(start, ())
        )

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, {name: graph[name] for name in cycles}
    assert not graph["base"] & {"terminal", "logging", "jsonl", "defaults"}
