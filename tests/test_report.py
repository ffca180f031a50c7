"""``gradwatch report``: reading back a recorded run, whole, truncated or not a record at all."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

import gradwatch
from gradwatch import cli
from gradwatch.report import load, print_report, sample_indices, sparkline

pytest.importorskip("sklearn", reason="the recorded run trains on digits (the 'demo' extra)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A real run: the 30-layer sigmoid MLP for 60 steps (monitored at 0, 10, ..., 50)."""
    from gradwatch.demo.data import load_digits
    from gradwatch.demo.nets import get_net
    from gradwatch.demo.run import train_net

    path = tmp_path_factory.mktemp("report") / "sigmoid.jsonl"
    recorder = gradwatch.JsonlRecorder(path, meta={"model": "sigmoid"})
    run = train_net(get_net("sigmoid"), load_digits(), steps=90, reporters=[recorder])
    assert [f.code for f in run.problems] == ["GW101"]
    return path


def test_report_prints_findings_summary_and_gradients_per_layer(recorded, capsys):
    assert cli.main(["report", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert "model=sigmoid" in out
    assert "6 monitored step(s) (steps 0..75)" in out
    assert "GW101 vanishing-gradient" in out
    lines = out.splitlines()
    summary = lines[lines.index("summary") + 3]
    assert summary.startswith("GW101 vanishing-gradient") and "active" in summary
    # The per-layer table: one row per weight layer, the first layer's gradient exactly 0.
    header = next(line for line in lines if line.startswith("layer "))
    assert "step 0" in header and "step 75" in header
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("linear")}
    assert len(rows) == 30
    assert rows["linear1"][1:7] == ["0"] * 6
    assert all(float(v) > 0 for v in rows["linear30"][1:7])
    # Not a terminal: plain text, no box drawing.
    assert "┃" not in out and "╭" not in out


def test_report_uses_rich_tables_in_a_terminal(recorded):
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    print_report(load(recorded), recorded, console)
    text = console.file.getvalue()
    assert "┃" in text and "GW101" in text


def test_a_truncated_last_line_is_skipped(recorded, tmp_path, capsys):
    text = recorded.read_text()
    cut = tmp_path / "crashed.jsonl"
    cut.write_text(text[: len(text) - 40])  # the summary line, cut mid-way
    assert cli.main(["report", str(cut)]) == 0
    out = capsys.readouterr().out
    assert "last line was cut off" in out
    assert "rebuilt from the findings" in out
    lines = out.splitlines()
    assert lines[lines.index("summary") + 3].startswith("GW101 vanishing-gradient")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("this is not json\n{}\n", "line 1 is not valid JSON"),
        ("", "is empty"),
        ('{"hello": "world"}\n', "has no gradwatch lines"),
        ("[1, 2, 3]\n[4]\n", "line 1 is not a JSON object"),
        (b"\xff\xfe\x00binary", "not a text file"),
    ],
)
def test_an_invalid_file_is_a_clear_error_with_exit_code_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert cli.main(["report", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gradwatch report: ")
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_a_missing_file_or_a_folder_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nothing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_png_draws_a_layers_by_steps_heatmap_and_the_norms(recorded, tmp_path, capsys):
    numpy = pytest.importorskip("numpy", reason="--png needs the 'plot' extra (matplotlib)")
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    png = tmp_path / "out" / "report.png"
    assert cli.main(["report", str(recorded), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert str(png) in capsys.readouterr().out

    from gradwatch.report import report_figure

    figure = report_figure(load(recorded))
    heat_ax, norm_ax = figure.axes[0], figure.axes[1]
    data = heat_ax.images[0].get_array()
    assert data.shape == (30, 6)  # layers x monitored steps
    # Exact zeros (the first layers) have no log: they are left blank (grey), not drawn.
    blank = numpy.ma.getmaskarray(data) | numpy.isnan(numpy.ma.getdata(data))
    assert blank[0].all() and not blank[-1].any()
    assert norm_ax.get_yscale() == "log"
    labelled = [line.get_label() for line in norm_ax.get_lines()]
    assert "linear30" in labelled


def test_png_with_an_unknown_format_is_refused(recorded, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    assert cli.main(["report", str(recorded), "--png", str(tmp_path / "r.nope")]) == 2
    captured = capsys.readouterr()
    assert "r.nope" in captured.err and captured.out == ""


def test_sparkline_and_column_sampling():
    assert sparkline([1e-3, 1e-2, 1e-1, 0.0, None], plain=True) == ".+@ -"
    assert sparkline([float("nan"), 1.0]) == "!█"
    assert sample_indices(20, 4) == [0, 6, 13, 19]
    assert sample_indices(3) == [0, 1, 2]


def test_report_reads_a_record_with_nonfinite_values(tmp_path, capsys):
    path = tmp_path / "nan.jsonl"
    lines = [
        {"type": "run", "format": "gradwatch-jsonl/1", "version": "0", "meta": {}},
        {
            "type": "step",
            "step": 0,
            "global_grad_norm": "nan",
            "layers": {
                "fc": {"name": "fc", "kind": "linear", "grad_norm": "nan", "grad_rms": "nan"}
            },
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nan" in out and "!" in out
