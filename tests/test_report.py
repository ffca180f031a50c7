"""``gradwatch report``: reading back a recorded run, whole, truncated or not a record at all."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

import gradwatch
from gradwatch import cli
from gradwatch.report import load, log_range, print_report, sample_indices, sparkline

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
    # The per-layer table: one row per weight layer, the first layer's gradient ~1e-28.
    header = next(line for line in lines if line.startswith("layer "))
    assert "step 0" in header and "step 75" in header
    shown = header.count("step ")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("linear")}
    assert len(rows) == 30
    assert all(float(v) < 1e-20 for v in rows["linear1"][1 : 1 + shown])
    assert all(float(v) > 1e-6 for v in rows["linear30"][1 : 1 + shown])
    # Not a terminal: plain text, no box drawing.
    assert "┃" not in out and "╭" not in out


def test_report_shows_each_findings_fix(recorded, capsys):
    assert cli.main(["report", str(recorded)]) == 0
    out = capsys.readouterr().out
    finding = load(recorded).findings[0]
    assert "fix: " in out
    # the whole hint, wrapped at the width but word for word
    assert " ".join(finding.hint.split()) in " ".join(out.replace("\n  ", " ").split())


@pytest.mark.parametrize("width", [80, 100, 140])
def test_report_lines_fit_the_console_width(recorded, width):
    for terminal in (False, True):
        console = Console(file=io.StringIO(), width=width, force_terminal=terminal)
        print_report(load(recorded), recorded, console)
        lines = console.file.getvalue().splitlines()
        too_wide = [line for line in lines if len(_ANSI.sub("", line)) > width]
        assert not too_wide, (terminal, too_wide[:3])
        assert any("linear30" in line for line in lines)


_ANSI = __import__("re").compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_long_run_keeps_the_sparkline_short(tmp_path, capsys, monkeypatch):
    path = tmp_path / "long.jsonl"
    lines = [{"type": "run", "format": "gradwatch-jsonl/1", "version": "0", "meta": {}}]
    for step in range(300):
        layers = {
            f"block{i}.with.a.long.name": {
                "name": f"block{i}.with.a.long.name",
                "kind": "linear",
                "grad_rms": 10.0 ** (-i) * (1 + step % 3),
                "grad_norm": 1.0,
            }
            for i in range(4)
        }
        lines.append({"type": "step", "step": step, "global_grad_norm": 1.0, "layers": layers})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "24 of 300 monitored steps" in out


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
    words = " ".join(out.split())  # lines are wrapped at the console's width
    assert "last line was cut off" in words
    assert "rebuilt from the findings" in words
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
    assert captured.err.count(str(path)) == 1  # the file is named once
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
    # one log scale: the first layer ~20 orders of magnitude below the last
    values = numpy.ma.getdata(data)
    blank = numpy.ma.getmaskarray(data) | numpy.isnan(values)
    assert not blank[-1].any()
    assert (blank[0] | (values[0] < values[-1] - 15)).all()
    assert norm_ax.get_yscale() == "log"
    labelled = [line.get_label() for line in norm_ax.get_lines()]
    assert "linear30" in labelled


def test_png_to_an_unwritable_path_is_refused_before_the_report(recorded, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    png = blocker / "report.png"  # a folder that cannot exist: its parent is a file
    assert cli.main(["report", str(recorded), "--png", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gradwatch report: cannot write")
    assert captured.err.count(str(blocker)) == 1


def test_png_with_an_unknown_format_is_refused(recorded, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    assert cli.main(["report", str(recorded), "--png", str(tmp_path / "r.nope")]) == 2
    captured = capsys.readouterr()
    assert "r.nope" in captured.err and captured.out == ""


def test_sparkline_and_column_sampling():
    assert sparkline([1e-3, 1e-2, 1e-1, 0.0, None], plain=True) == ".*@ -"
    assert sparkline([float("nan"), 1.0]) == "!█"
    # "-" means "not measured" only: no level is drawn with it.
    levels = sparkline([10.0**-k for k in range(12)], plain=True)
    assert "-" not in levels and len(set(levels)) == 8


def test_one_log_scale_for_all_rows_so_a_wobble_is_not_a_cliff():
    wobble = [1e-3, 3e-3, 1e-3, 3e-3]
    cliff = [1e-3, 1e-3, 1e-15, 1e-15]
    scale = log_range([wobble, cliff])
    assert len(set(sparkline(wobble, plain=True, scale=scale))) == 1  # 3x: one level
    assert len(set(sparkline(cliff, plain=True, scale=scale))) == 2
    # each row on its own scale, the wobble would span the whole ramp
    assert sparkline(wobble, plain=True) == ".@.@"
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


def test_report_json_has_the_findings_summary_and_every_layers_series(recorded, capsys):
    assert cli.main(["report", str(recorded), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)  # standard output is the document only
    record = load(recorded)
    assert document["meta"] == {"model": "sigmoid"}
    assert document["steps"] == [s.step for s in record.steps] == [0, 15, 30, 45, 60, 75]
    assert [(f["code"], f["step"]) for f in document["findings"]] == [
        (f.code, f.step) for f in record.findings
    ]
    assert document["findings"][0]["hint"] == record.findings[0].hint
    assert [row["code"] for row in document["summary"]] == ["GW101"]
    names = [layer["name"] for layer in document["layers"]]
    assert names == [f"linear{i}" for i in range(1, 31)]
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert all(len(layer["grad_rms"]) == 6 for layer in layers.values())
    assert max(layers["linear1"]["grad_rms"]) < 1e-20 < 1e-6 < min(layers["linear30"]["grad_rms"])
    # docs/output.md names every key of the document
    described = (Path(__file__).resolve().parents[1] / "docs" / "output.md").read_text()
    for key in [*document, *document["layers"][0]]:
        assert f"`{key}`" in described, key


def _record_with_gaps(path: Path) -> Path:
    """fc1 measured, then exactly 0, then not measured, then NaN; fc2 a healthy wobble."""
    lines = [{"type": "run", "format": "gradwatch-jsonl/1", "version": "0", "meta": {}}]
    fc1 = [1e-3, 0.0, None, "nan"]
    for step, value in enumerate(fc1):
        layers = {"fc2": {"name": "fc2", "kind": "linear", "grad_rms": 2e-3 * (1 + step % 2),
                          "grad_norm": 0.1, "depth": 1.0}}
        if value is not None:
            layers["fc1"] = {"name": "fc1", "kind": "linear", "grad_rms": value,
                             "grad_norm": value, "depth": 0.0}
        lines.append({"type": "step", "step": step * 10, "global_grad_norm": 1.0,
                      "layers": layers})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_report_json_tells_zero_from_not_measured(tmp_path, capsys):
    path = _record_with_gaps(tmp_path / "gaps.jsonl")
    assert cli.main(["report", str(path), "--json"]) == 0
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["fc1"]["grad_rms"] == [1e-3, 0.0, None, "nan"]


def test_png_gives_zero_not_measured_and_nan_their_own_labelled_colours(tmp_path):
    pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")
    from gradwatch.report import CELL_KINDS, MIN_DECADES, heatmap_cells, report_figure

    record = load(_record_with_gaps(tmp_path / "gaps.jsonl"))
    assert heatmap_cells(record, ["fc1", "fc2"]) == [
        ["value", "zero", "unmeasured", "nonfinite"],
        ["value"] * 4,
    ]
    figure = report_figure(record)
    heat_ax, norm_ax = figure.axes[0], figure.axes[1]
    values, others = heat_ax.images
    # each kind of cell without a value gets its own colour index, and a legend entry
    kinds = others.get_array()
    assert [kinds[0][i] for i in (1, 2, 3)] == [0, 1, 2]
    assert kinds.mask[0][0] and kinds.mask[1].all()
    legend = [text.get_text() for text in heat_ax.get_legend().get_texts()]
    assert legend == [label for label, _ in CELL_KINDS.values()]
    assert len({colour for _, colour in CELL_KINDS.values()}) == len(CELL_KINDS)
    # a 2x wobble does not fill the colour scale
    low, high = values.get_clim()
    assert high - low >= MIN_DECADES
    # the layer colour bar names the layers at whole positions
    depth_bar = figure.axes[-1]
    assert list(depth_bar.get_yticks()) == [0, 1]
    assert [t.get_text() for t in depth_bar.get_yticklabels()] == ["fc1", "fc2"]
    # an exact zero of the norm is drawn and named, not left as a gap
    assert "exactly 0" in norm_ax.get_legend().get_texts()[0].get_text()


def test_the_text_chart_says_what_its_characters_mean(recorded, capsys):
    assert cli.main(["report", str(recorded)]) == 0
    caption = " ".join(capsys.readouterr().out.split())
    assert "'.' = " in caption and "'@' = " in caption
    assert "blank = exactly 0, '-' = not measured, '!' = NaN/Inf" in caption
