"""``gradwatch demo``: the classic deep sigmoid vs ReLU vs residual networks trained on
digits, judged by gradwatch; and the README's demo blocks checked against its output.

One full demo run (six networks, default steps and seed) is shared by the tests that
read its outcome; the CLI tests train only the two small networks.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

pytest.importorskip("sklearn", reason="the demo needs the 'demo' extra (scikit-learn)")
pytest.importorskip("matplotlib", reason="--png needs the 'plot' extra (matplotlib)")

import gradwatch
import gradwatch.demo.data
from gradwatch import cli
from gradwatch.demo import DemoResult, readme, run_demo, select_nets
from gradwatch.demo.nets import NETS, net_names
from gradwatch.demo.options import NET_NAMES
from gradwatch.demo.run import train_net

README = Path(__file__).resolve().parents[1] / "README.md"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WITH_FINDINGS = ["sigmoid", "relu-default-init", "relu-high-lr"]
HEALTHY = ["relu-kaiming", "sigmoid-residual", "leaky-high-lr"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DemoResult, Path, str]:
    out = tmp_path_factory.mktemp("demo")
    console = Console(file=io.StringIO(), width=140)
    result = run_demo(png=out / "flow.png", record=out / "records", console=console)
    return result, out, console.file.getvalue()


def _run(result: DemoResult, name: str):
    return next(run for run in result.runs if run.net.name == name)


def test_the_demo_trains_every_network_for_the_default_steps(demo):
    result, _, _ = demo
    assert [run.net.name for run in result.runs] == net_names()
    assert {run.steps for run in result.runs} == {200}
    assert set(WITH_FINDINGS) | set(HEALTHY) == set(net_names())


@pytest.mark.parametrize("name", WITH_FINDINGS)
def test_broken_networks_get_a_warning_or_an_error(demo, name):
    result, _, _ = demo
    run = _run(result, name)
    assert run.problems, f"{name}: gradwatch found nothing ({run.findings})"


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_networks_get_no_warning_or_error_and_learn(demo, name):
    result, _, _ = demo
    run = _run(result, name)
    assert run.problems == [], [f.title + ": " + f.message for f in run.problems]
    assert run.accuracy > 0.7, f"{name} should learn; held-out accuracy {run.accuracy:.2f}"
    assert run.first_last_ratio is not None and run.first_last_ratio > 1e-2


def test_the_deep_sigmoid_net_starves_its_first_layer_completely(demo):
    result, _, _ = demo
    run = _run(result, "sigmoid")
    vanishing = [f for f in run.problems if f.code == "GW101"]
    assert vanishing and vanishing[0].severity == "error"
    # ~1e-28: an update lr * g is some 20 orders of magnitude below what can change a
    # float32 weight (the error says so: w - lr*g == w)
    assert vanishing[0].evidence["first_layer_grad_rms"] < 1e-20
    assert run.layer_rms[0][0] == "linear1" and run.layer_rms[0][1] < 1e-20
    assert run.accuracy < 0.2  # chance is 0.1: it does not learn


def test_relu_with_default_init_vanishes_too(demo):
    result, _, _ = demo
    run = _run(result, "relu-default-init")
    vanishing = [f for f in run.problems if f.code == "GW101"]
    assert vanishing, run.findings
    assert 0 < run.first_last_ratio < 1e-6  # ~1e-11 measured
    assert run.accuracy < 0.2
    kaiming = _run(result, "relu-kaiming")
    assert kaiming.first_last_ratio > 1e4 * run.first_last_ratio


def test_a_large_learning_rate_kills_relu_units_but_not_leaky_ones(demo):
    result, _, _ = demo
    relu, leaky = _run(result, "relu-high-lr"), _run(result, "leaky-high-lr")
    dead = [f for f in relu.problems if f.code == "GW201"]
    assert dead, relu.findings
    assert dead[0].evidence["dead_fraction"] > 0.5
    # The units died; the run did not blow up: no NaN, a finite loss.
    assert not [f for f in relu.findings if f.code == "GW103"]
    assert math.isfinite(relu.final_loss)
    assert leaky.accuracy > relu.accuracy + 0.3


def test_the_results_table_and_verdict_are_printed(demo):
    result, _, output = demo
    assert result.as_expected
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    for column in ("first/last grad RMS", "findings", "final loss", "accuracy"):
        assert column in header
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.strip() or line.startswith("first/last"):
            break
        rows[line.split()[0]] = line
    assert sorted(rows) == sorted(net_names())
    assert "GW101 error" in rows["sigmoid"]
    assert "none" in rows["relu-kaiming"]
    assert "GW201" in rows["relu-high-lr"]
    assert "As the classic experiment (deep sigmoid vs ReLU vs residual) predicts" in output


def test_the_figure_has_one_panel_per_depth_and_a_curve_per_network(demo):
    result, out, _ = demo
    png = out / "flow.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    deep, shallow = result.figure.axes  # 30-layer nets, then 4-layer nets: none squeezed
    curves = {}
    for ax in (deep, shallow):
        assert ax.get_yscale() == "log"
        curves.update({ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() in NET_NAMES})
    assert sorted(curves) == sorted(net_names())
    assert {ln.get_label() for ln in shallow.get_lines()} >= {"relu-high-lr", "leaky-high-lr"}
    assert list(curves["sigmoid"].get_xdata()) == list(range(1, 31))
    assert list(curves["relu-high-lr"].get_xdata()) == [1, 2, 3, 4]
    assert shallow.get_xlim()[1] < 5  # the 4-layer nets fill their own axis
    # The sigmoid net's first layer (~1e-28) is far below its last.
    ys = list(curves["sigmoid"].get_ydata())
    assert ys[0] < 1e-20 < 1e-6 < ys[-1]
    # Exact zeros (relu-high-lr's dead layers) are named in the panel that draws them.
    from gradwatch.demo.figure import ZERO_LABEL

    def legend(ax):
        return [text.get_text() for text in ax.get_legend().get_texts()]

    assert any(text.startswith(ZERO_LABEL) for text in legend(shallow))
    assert not any(text.startswith(ZERO_LABEL) for text in legend(deep))


def test_records_hold_each_run_and_report_reads_them(demo, capsys):
    result, out, _ = demo
    files = sorted(p.name for p in (out / "records").iterdir())
    assert files == sorted(f"{name}.jsonl" for name in net_names())
    for run in result.runs:
        record = gradwatch.read_record(out / "records" / f"{run.net.name}.jsonl")
        assert record.meta["model"] == run.net.name
        assert len(record.steps) == 14  # 200 steps, every 15th monitored
        assert [(f.code, f.step) for f in record.findings] == [
            (f.code, f.step) for f in run.findings
        ]
    assert cli.main(["report", str(out / "records" / "sigmoid.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "GW101 vanishing-gradient" in printed
    assert "linear30" in printed


def test_cli_runs_a_subset_and_matches_the_full_run(demo, tmp_path, capsys):
    full, _, _ = demo
    code = cli.main(
        [
            "demo",
            "--only",
            "leaky-high-lr,relu-high-lr",
            "--record",
            str(tmp_path / "records"),
            "--png",
            str(tmp_path / "small.png"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "relu-high-lr" in printed and "leaky-high-lr" in printed
    assert "relu-kaiming" not in printed
    assert (tmp_path / "small.png").read_bytes()[:8] == PNG_SIGNATURE
    # Each network's weights and batches depend only on the seed, not on the selection.
    record = gradwatch.read_record(tmp_path / "records" / "relu-high-lr.jsonl")
    expected = _run(full, "relu-high-lr").findings
    assert [(f.code, f.step) for f in record.findings] == [(f.code, f.step) for f in expected]


class _TerminalStderr(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_findings_print_above_the_progress_bar_in_a_terminal(monkeypatch):
    # A terminal on both streams: the progress display on stdout, rich panels on stderr.
    stderr = _TerminalStderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    result = run_demo(["relu-high-lr"], console=console)
    assert result.runs[0].problems
    lines = [ANSI.sub("", line) for line in console.file.getvalue().splitlines()]
    # Under the progress display sys.stderr is rich's proxy: a panel must reach the
    # display's console (which prints it above the bar), each on a line of its own, and
    # not go around it to the terminal beneath.
    tops = [line for line in lines if "GW201 dead-units" in line and "╭" in line]
    assert tops, "the finding did not go through the progress display's console"
    assert all(line.lstrip("\r").startswith("╭") for line in tops), tops
    assert "GW201" not in stderr.getvalue()


def test_the_demo_computes_the_same_bits_whatever_the_callers_thread_count(demo):
    """CPU kernels split their sums by thread count, and high-rate training magnifies the
    last-bit differences: the demo trains on one thread, so a caller with 2 threads gets
    exactly the run a caller with 1 thread gets (the fixture ran under 1)."""
    full, _, _ = demo
    net = next(n for n in NETS if n.name == "relu-high-lr")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = train_net(net, gradwatch.demo.data.load_digits())
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    same = _run(full, "relu-high-lr")
    assert [(f.code, f.severity, f.step) for f in run.findings] == [
        (f.code, f.severity, f.step) for f in same.findings
    ]
    assert run.final_loss == same.final_loss and run.accuracy == same.accuracy


def test_the_readme_findings_are_the_demos(demo):
    """On any machine: the README's models, depths and findings columns, and the hero
    panel's finding, are what this demo run found."""
    result, _, _ = demo
    written, fresh = readme.read_blocks(README.read_text()), readme.render(result)
    assert sorted(written) == sorted(readme.BLOCKS)
    columns = ["model", "layers", "findings"]
    assert readme.table_columns(written["results"], columns) == readme.table_columns(
        fresh["results"], columns
    ), "README demo table drifted: python -m gradwatch.demo.readme --write"
    title = [line for line in written["hero"].splitlines() if line.startswith("╭")]
    assert title == [line for line in fresh["hero"].splitlines() if line.startswith("╭")]


def test_the_readme_demo_blocks_are_the_demos_output(demo):
    """On the machine the README names: every block, numbers included, is exactly what
    this run prints (elsewhere rounding differs: the test above checks the findings)."""
    result, _, _ = demo
    written, fresh = readme.read_blocks(README.read_text()), readme.render(result)
    if written["measured"] != fresh["measured"]:
        pytest.skip(
            f"the README's numbers were measured elsewhere ({written['measured'].strip()}); "
            f"this machine: {fresh['measured'].strip()}"
        )
    for name in readme.BLOCKS:
        assert written[name] == fresh[name], (
            f"README block {name!r} differs from the demo's output; "
            "rewrite it with: python -m gradwatch.demo.readme --write"
        )


def test_the_readme_blocks_are_replaced_in_place():
    text = "intro\n<!-- gradwatch-demo:results -->\nold\n<!-- /gradwatch-demo:results -->\nend\n"
    new = readme.replace_blocks(text, {"results": "new\n"})
    assert new == text.replace("old\n", "new\n")
    with pytest.raises(ValueError, match="hero"):
        readme.replace_blocks(text, {"hero": "x\n"})


def test_the_torch_free_option_list_names_every_network():
    assert list(NET_NAMES) == net_names()


def test_an_unwritable_png_fails_before_any_training(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    png = blocker / "flow.png"  # its folder cannot be created: the parent is a file
    assert cli.main(["demo", "--only", "relu-high-lr", "--png", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gradwatch demo: cannot write")
    assert captured.err.count(str(blocker)) == 1
    assert "[1/1]" not in captured.out  # nothing was trained
    assert blocker.read_text() == ""


def test_a_png_check_leaves_no_file_behind(tmp_path):
    from gradwatch.demo.figure import check_image_path

    check_image_path(tmp_path / "new" / "flow.png")
    assert not (tmp_path / "new" / "flow.png").exists()


def test_select_nets_takes_repeats_and_comma_lists_in_demo_order():
    names = [n.name for n in select_nets(["leaky-high-lr,sigmoid", "relu-kaiming"])]
    assert names == ["sigmoid", "relu-kaiming", "leaky-high-lr"]
    assert [n.name for n in select_nets(None)] == [n.name for n in NETS]


def test_unknown_network_name_lists_the_valid_ones(capsys):
    assert cli.main(["demo", "--only", "sigmoid,resnet"]) == 2
    err = capsys.readouterr().err
    assert "'resnet'" in err
    for name in net_names():
        assert name in err


def test_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_missing_scikit_learn_names_the_demo_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # simulate: not installed
    assert cli.main(["demo", "--only", "relu-high-lr"]) == 2
    captured = capsys.readouterr()
    assert 'pip install "scikit-learn>=1.2"' in captured.err
    assert 'pip install -e ".[demo]"' in captured.err
    assert "Traceback" not in captured.err


def test_missing_matplotlib_names_the_plot_extra_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # simulate: not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["demo", "--only", "relu-high-lr", "--png", str(tmp_path / "f.png")]) == 2
    captured = capsys.readouterr()
    assert 'pip install -e ".[plot]"' in captured.err
    assert "[1/1]" not in captured.out  # failed before training
    assert not (tmp_path / "f.png").exists()


def test_an_image_format_matplotlib_cannot_write_is_refused_before_training(capsys, tmp_path):
    assert cli.main(["demo", "--only", "relu-high-lr", "--png", str(tmp_path / "f.xyz")]) == 2
    captured = capsys.readouterr()
    assert "f.xyz" in captured.err and ".png" in captured.err
    assert "[1/1]" not in captured.out


def test_the_gradwatch_console_script_runs_the_demo(tmp_path):
    script = shutil.which("gradwatch", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the gradwatch console script is not installed (pip install -e .)")
    proc = subprocess.run(
        [script, "demo", "--only", "leaky-high-lr", "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaky-high-lr" in proc.stdout
    assert "none" in proc.stdout
