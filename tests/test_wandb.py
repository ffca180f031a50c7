"""The W&B reporter against the real wandb library, offline: what it wrote is read back
from the run's transaction log (tests/wandb_log.py)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, GradwatchWarning, Reporter

from .support import digits, mlp
from .wandb_log import LogFormatError, offline_run, read_run_log, read_table

wandb = pytest.importorskip("wandb")
from gradwatch.integrations.wandb import WandbReporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVERY = 10


class Recorder(Reporter):
    """Keeps what the watcher measured, to compare with what W&B stored."""

    name = "recorder"

    def __init__(self) -> None:
        self.stats: dict[int, gradwatch.StepStats] = {}

    def report(self, stats, findings):
        self.stats[stats.step] = stats


@pytest.fixture(autouse=True)
def _finish_leftover_run():
    """A test that fails half-way must not leave its run as wandb.run for the next one."""
    yield
    if wandb.run is not None:
        wandb.finish()


def train_logging(
    model: nn.Module,
    watcher: gradwatch.Watcher,
    run,
    *,
    steps: int = 150,
    style: str = "after",
    lr: float = 0.05,
    before_step=None,
) -> list[float]:
    """Train on digits, logging the loss to W&B the way a user would (``style``)."""
    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        value = float(loss.detach())
        losses.append(value)
        if style == "before":
            run.log({"loss": value})
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
        if style == "after":
            run.log({"loss": value})
        elif style == "explicit":
            run.log({"loss": value}, step=step)
        elif style == "rare" and step % 25 == 0:
            run.log({"loss": value})
    return losses


@pytest.fixture(scope="module")
def tanh_run(tmp_path_factory):
    """A deep tanh MLP with small init, 150 steps, the user logging the loss every step."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("wandb-tanh")
    run = offline_run(directory, "tanh")
    model = mlp(12, nn.Tanh, std=0.05)
    recorder = Recorder()
    reporter = WandbReporter()  # finds wandb.run
    watcher = gradwatch.watch(model, every_n_steps=EVERY, reporters=[reporter, recorder])
    losses = train_logging(model, watcher, run, steps=150, style="after")
    watcher.close()
    sync_file = run.settings.sync_file
    run.finish()
    return {
        "log": read_run_log(sync_file),
        "sync_file": sync_file,
        "watcher": watcher,
        "reporter": reporter,
        "recorder": recorder,
        "losses": losses,
    }


def test_log_reader_round_trips_records_split_across_blocks(tmp_path):
    """The reader against a file wandb wrote: a 100 kB value spans four 32 KiB blocks
    (first/middle/last chunks), 300 small rows cross block edges; a flipped byte is caught."""
    run = offline_run(tmp_path, "reader")
    big = "".join(chr(65 + i % 26) for i in range(100_000))
    run.log({"big": big})
    for i in range(300):
        run.log({"i": i, "pad": "x" * 400})
    run.alert(title="reader check", text="body", level="ERROR", wait_duration=90)
    run.summary["answer"] = 42
    sync_file = Path(run.settings.sync_file)
    run.finish()
    log = read_run_log(sync_file)
    assert sync_file.stat().st_size > 4 * 32 * 1024
    assert log.history[0]["big"] == big
    assert [row["i"] for row in log.history[1:]] == list(range(300))
    assert [row.step for row in log.history] == list(range(301))
    assert [(a.title, a.text, a.level, a.wait_duration) for a in log.alerts] == [
        ("reader check", "body", "ERROR", 90_000)
    ]
    assert log.summary["answer"] == 42 and log.exited
    damaged = tmp_path / "damaged.wandb"
    data = bytearray(sync_file.read_bytes())
    data[40_000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match="CRC mismatch"):
        read_run_log(damaged, wait=0)


def test_importing_gradwatch_does_not_import_wandb():
    code = (
        "import sys, gradwatch, gradwatch.integrations, gradwatch.integrations.wandb\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_deep_tanh_run_raises_a_vanishing_gradient_alert(tanh_run):
    log, watcher = tanh_run["log"], tanh_run["watcher"]
    first = [f for f in watcher.findings if f.code == "GW101" and f.status == "new"]
    assert first, "the deep tanh model should get GW101"
    alerts = [a for a in log.alerts if "GW101" in a.title]
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.title == "GW101 vanishing-gradient"
    assert alert.level == "WARN"
    assert alert.wait_duration == 300_000  # 300 s, stored in milliseconds
    assert f"Step: {first[0].step}" in alert.text
    assert "Layers: 0 (Linear), 2 (Linear)" in alert.text
    assert "Evidence: ratio=" in alert.text
    assert "Fix: " in alert.text and "ReLU" in alert.text
    assert tanh_run["reporter"].disabled is None


def test_metrics_land_in_the_users_rows_without_moving_the_step(tanh_run):
    log, recorder, losses = tanh_run["log"], tanh_run["recorder"], tanh_run["losses"]
    # The user logged 150 times: their rows are _step 0..149, none added in between.
    assert [row.step for row in log.rows_with("loss")] == list(range(150))
    assert [row["loss"] for row in log.rows_with("loss")] == pytest.approx(losses)
    # watcher.close() puts the findings table and last chart in the row being built, which
    # run.finish() commits: one row after the user's, no row in between.
    assert [row.step for row in log.history] == list(range(151))
    assert "gradwatch/findings_table" in log.history[-1]
    with_gradwatch = [row.step for row in log.rows_with("gradwatch/step")]
    assert with_gradwatch == list(range(0, 150, EVERY))
    for row in log.rows_with("gradwatch/step"):
        stats = recorder.stats[row.step]
        assert row["gradwatch/step"] == row.step == stats.step
        assert row["gradwatch/grad_rms/0"] == pytest.approx(stats.layers["0"].grad_rms, rel=1e-12)
        assert row["gradwatch/grad_norm/22"] == pytest.approx(
            stats.layers["22"].grad_norm, rel=1e-12
        )
        assert row["gradwatch/global_grad_norm"] == pytest.approx(stats.global_grad_norm)
        # The signal dies on the input side: the first layer gets ~1e-3 of the last one's.
        assert row["gradwatch/grad_rms_ratio"] < 0.01
    assert log.history_at(5).values.keys().isdisjoint(log.keys("gradwatch/"))


def test_history_keys_and_metric_definitions(tanh_run):
    log = tanh_run["log"]
    keys = log.keys("gradwatch/")
    weight_layers = [str(i) for i in range(0, 24, 2)]
    assert {f"gradwatch/grad_rms/{n}" for n in weight_layers} <= keys
    assert {f"gradwatch/grad_norm/{n}" for n in weight_layers} <= keys
    assert any(k.startswith("gradwatch/saturated_fraction/") for k in keys)
    assert {"gradwatch/global_grad_norm", "gradwatch/active_findings"} <= keys
    assert log.rows_with("gradwatch/findings/GW101")[-1]["gradwatch/findings/GW101"] >= 1
    assert log.history_at(140)["gradwatch/active_findings"] == 1
    defined = {m["name"]: m["step_metric"] for m in log.metrics if m["name"]}
    assert defined["gradwatch/grad_rms/0"] == "gradwatch/step"
    assert defined["gradwatch/global_grad_norm"] == "gradwatch/step"
    assert not any(m["glob_name"] for m in log.metrics)


def test_gradient_flow_chart_shows_where_the_signal_dies(tanh_run):
    log, sync_file = tanh_run["log"], tanh_run["sync_file"]
    panel = log.config["_wandb"]["visualize"]["gradwatch/gradient_flow"]
    assert panel["panel_config"]["panelDefId"] == "wandb/line/v0"
    assert panel["panel_config"]["fieldSettings"]["y"] == "log10_grad_rms"
    charted = {
        row["gradwatch/step"]
        for row in log.rows_with("gradwatch/gradient_flow_table")
        if "gradwatch/step" in row
    }
    first_finding = tanh_run["watcher"].findings[0].step
    assert {0, first_finding, 100} <= charted  # every 10 monitored steps and at a finding
    # The chart shows the latest table: close() drew the last monitored step (140) too.
    columns, rows = read_table(sync_file, log.summary["gradwatch/gradient_flow_table"])
    assert columns == ["step", "depth", "layer", "grad_rms", "log10_grad_rms"]
    last = [r for r in rows if r[0] == "step 140"]
    assert [r[2] for r in last] == [str(i) for i in range(0, 24, 2)]
    assert [r[1] for r in last] == list(range(12))
    assert last[-1][4] - last[0][4] > 2  # >2 decades between output and input side
    # One line per charted step (up to chart_history=5): at 0, the finding, 100, and close.
    assert {r[0] for r in rows} == {f"step {s}" for s in (0, first_finding, 100, 140)}


def test_findings_table_and_summary_at_close(tanh_run):
    log, sync_file, watcher = tanh_run["log"], tanh_run["sync_file"], tanh_run["watcher"]
    columns, rows = read_table(sync_file, log.summary["gradwatch/findings_table"])
    assert columns[:5] == ["step", "code", "rule", "severity", "status"]
    assert [r[1:5] for r in rows if r[4] == "new"] == [
        ["GW101", "vanishing-gradient", "warning", "new"]
    ]
    row = watcher.summary()[0]
    assert log.summary["gradwatch/GW101/count"] == 1
    assert log.summary["gradwatch/GW101/first_step"] == row.first_step
    assert log.summary["gradwatch/GW101/status"] == "active"
    assert log.summary["gradwatch/problems"] == len(watcher.summary())


def test_healthy_model_gets_no_alert_and_unlogged_values_are_kept(tmp_path):
    """Kaiming-init ReLU MLP: no alert. The user logs nothing, so no row is committed until
    run.finish(): the last monitored step's values are in that row, every earlier one in
    gradwatch/stats_table."""
    torch.manual_seed(0)
    run = offline_run(tmp_path, "healthy")
    model = mlp(6, nn.ReLU, init="kaiming")
    recorder = Recorder()
    watcher = gradwatch.watch(model, every_n_steps=EVERY, reporters=[WandbReporter(run), recorder])
    with pytest.warns(GradwatchWarning, match="gradwatch never commits rows itself"):
        train_logging(model, watcher, run, steps=150, style="none")
    watcher.close()
    sync_file = run.settings.sync_file
    run.finish()
    log = read_run_log(sync_file)
    assert watcher.findings == []
    assert log.alerts == []
    assert [row["gradwatch/step"] for row in log.rows_with("gradwatch/step")] == [140]
    assert [row.step for row in log.history] == [0]
    columns, rows = read_table(sync_file, log.summary["gradwatch/stats_table"])
    assert [row[0] for row in rows] == list(range(0, 140, EVERY))
    grad_rms = columns.index("gradwatch/grad_rms/0")
    for row in rows:
        expected = recorder.stats[row[0]].layers["0"].grad_rms
        assert row[grad_rms] == pytest.approx(expected, rel=1e-12)
    assert any(k.startswith("gradwatch/active_fraction/") for k in log.keys("gradwatch/"))
    assert log.summary["gradwatch/problems"] == 0


@pytest.mark.filterwarnings("ignore:gradwatch. no W&B row was committed")  # one step, fed 7x
def test_alert_policy(tmp_path):
    """new alerts at or above the severity; worse only when the severity rises; reminders
    never; resolved as INFO when asked. Findings are fed in directly, W&B is real."""
    run = offline_run(tmp_path, "policy")
    model = mlp(2, nn.ReLU)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    model(torch.randn(8, 64)).sum().backward()
    watcher.step()
    stats = watcher.latest
    watcher.close()

    def finding(code, severity, status, step):
        return Finding(
            code=code,
            rule={"GW101": "vanishing-gradient", "GW201": "dead-units"}[code],
            severity=severity,
            step=step,
            layers=("0",),
            message=f"{code} {status}",
            hint="do this",
            evidence={"ratio": 1e-4},
            status=status,
        )

    reporter = WandbReporter(
        run, alert_on_resolved=True, alert_wait_duration=60, stats=(), chart_every=None
    )
    quiet = WandbReporter(run, prefix="quiet", alert_severity="error", chart_every=None)
    sequence = [
        finding("GW201", "info", "new", 0),  # below "warning": no alert
        finding("GW101", "warning", "new", 1),  # alert WARN
        finding("GW101", "warning", "worse", 2),  # same severity: no alert
        finding("GW101", "warning", "reminder", 3),  # never
        finding("GW101", "error", "worse", 4),  # rose: alert ERROR
        finding("GW101", "info", "resolved", 5),  # alert INFO "... resolved"
        finding("GW201", "info", "resolved", 6),  # GW201 never alerted: nothing
    ]
    for f in sequence:
        reporter.report(stats, [f])
        quiet.report(stats, [f])
    reporter.close([])
    quiet.close([])
    sync_file = run.settings.sync_file
    run.finish()
    alerts = read_run_log(sync_file).alerts
    assert [(a.title, a.level) for a in alerts] == [
        ("GW101 vanishing-gradient", "WARN"),
        ("GW101 vanishing-gradient", "ERROR"),
        ("GW101 vanishing-gradient", "ERROR"),  # the quiet reporter: errors only
        ("GW101 vanishing-gradient resolved", "INFO"),
    ]
    assert alerts[0].wait_duration == 60_000
    assert alerts[1].text.startswith("Worse than when first reported (now error).")
    assert reporter.alerts_sent == 3 and quiet.alerts_sent == 1


def test_layer_limit_options(tmp_path):
    torch.manual_seed(0)
    run = offline_run(tmp_path, "options")
    model = mlp(20, nn.ReLU, init="kaiming")
    reporter = WandbReporter(
        run, prefix="gw", stats=["grad_rms"], max_layers=5, chart_every=None, findings_table=False
    )
    watcher = gradwatch.watch(model, every_n_steps=EVERY, reporters=[reporter])
    train_logging(model, watcher, run, steps=30, style="after", lr=0.01)
    watcher.close()
    sync_file = run.settings.sync_file
    run.finish()
    log = read_run_log(sync_file)
    per_layer = sorted(k for k in log.keys("gw/") if k.startswith("gw/grad_rms/"))
    assert per_layer == sorted(f"gw/grad_rms/{n}" for n in ("0", "10", "20", "28", "38"))
    assert not log.keys("gradwatch/")
    assert not any("gradient_flow" in k or "table" in k for k in log.keys(""))
    assert log.summary["gw/problems"] == 0


def test_closing_after_finish_without_teardown_hooks_warns(tmp_path, monkeypatch):
    """A wandb without teardown hooks (simulated): the reporter cannot write at
    run.finish(), so a later watcher.close() says what was not written, and nothing waits."""
    from gradwatch.integrations import wandb as gw_wandb

    monkeypatch.setattr(gw_wandb, "call_at_finish", lambda run, callback: None)
    torch.manual_seed(0)
    run = offline_run(tmp_path, "no-hooks")
    model = mlp(3, nn.ReLU, init="kaiming")
    reporter = WandbReporter(run)
    watcher = gradwatch.watch(model, every_n_steps=EVERY, reporters=[reporter])
    train_logging(model, watcher, run, steps=30, style="after")
    sync_file = run.settings.sync_file
    run.finish()
    start = time.perf_counter()
    for _ in range(EVERY):  # training goes on after run.finish(): no waiting, no error
        model(torch.randn(8, 64)).sum().backward()
        watcher.step()
    assert time.perf_counter() - start < 5.0  # each used to wait 30 s on the finished run
    with pytest.warns(GradwatchWarning, match="finished before the watcher was closed"):
        watcher.close()
    assert reporter.disabled == "the W&B run is finished"
    log = read_run_log(sync_file)
    assert "gradwatch/findings_table" not in log.summary
    assert [row.step for row in log.rows_with("loss")] == list(range(30))


def test_a_failing_backend_switches_the_reporter_off_and_training_continues(
    tmp_path, monkeypatch, caplog
):
    """From step 50 on, every record wandb tries to send raises (the service is gone):
    the reporter says so once and goes quiet; training and the other reporters go on."""
    torch.manual_seed(0)
    run = offline_run(tmp_path, "failing")
    model = mlp(12, nn.Tanh, std=0.05)
    reporter = WandbReporter(run)
    recorder = Recorder()
    watcher = gradwatch.watch(model, every_n_steps=EVERY, reporters=[reporter, recorder])
    calls = []

    def broken(*args, **kwargs):
        calls.append(threading.get_ident())
        raise ConnectionResetError("wandb-core connection lost")

    def break_at(step):
        if step == 50:
            monkeypatch.setattr(run._interface, "_publish", broken)

    with (
        caplog.at_level(logging.ERROR, logger="gradwatch"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        losses = train_logging(model, watcher, run, steps=150, style="none", before_step=break_at)
        watcher.close()
    monkeypatch.undo()
    sync_file = run.settings.sync_file
    run.finish()

    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    assert sorted(recorder.stats) == list(range(0, 150, EVERY))  # others kept reporting
    # One failed attempt from the training thread, then the reporter stopped trying.
    assert calls.count(threading.main_thread().ident) == 1
    assert reporter.disabled is not None and "ConnectionResetError" in reporter.disabled
    assert not reporter.active
    errors = [r for r in caplog.records if "W&B reporter is now off" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert sum("W&B reporter is now off" in str(w.message) for w in caught) == 1
    assert watcher.disabled == {}  # handled inside the reporter, not by the watcher's guard
    log = read_run_log(sync_file)
    # The user logs nothing: the values of step 40, the last written before the failure,
    # are in the row run.finish() commits (the earlier ones were kept for the closing
    # table, which a reporter that is off does not write).
    steps = [row["gradwatch/step"] for row in log.rows_with("gradwatch/step")]
    assert steps == [40]
    assert [a.title for a in log.alerts] == ["GW101 vanishing-gradient"]


def test_without_a_run_it_warns_once_and_picks_up_a_later_run(tmp_path):
    assert wandb.run is None
    model = mlp(2, nn.ReLU)
    reporter = WandbReporter()
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[reporter])
    with pytest.warns(GradwatchWarning, match=r"no W&B run: call wandb.init\(\)"):
        for _ in range(2):
            model(torch.randn(8, 64)).sum().backward()
            watcher.step()
    run = offline_run(tmp_path, "late")
    model(torch.randn(8, 64)).sum().backward()
    watcher.step()
    watcher.close()
    sync_file = run.settings.sync_file
    run.finish()
    assert reporter.run is run
    assert [r["gradwatch/step"] for r in read_run_log(sync_file).rows_with("gradwatch/step")] == [2]


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alert_severity"):
        WandbReporter(alert_severity="warn")
    with pytest.raises(ValueError, match="alert_wait_duration"):
        WandbReporter(alert_wait_duration=0)
    with pytest.raises(ValueError, match="unknown statistic"):
        WandbReporter(stats=["grad_rsm"])
    with pytest.raises(ValueError, match="max_layers"):
        WandbReporter(max_layers=0)
    with pytest.raises(ValueError, match="chart_every"):
        WandbReporter(chart_every=2.5)
    with pytest.raises(ValueError, match="prefix"):
        WandbReporter(prefix="/")


DISABLED_SCRIPT = """
import os, torch, gradwatch
from gradwatch.integrations.wandb import WandbReporter
import wandb
run = wandb.init(project="gradwatch-tests")
assert run.disabled, "WANDB_MODE=disabled should give a disabled run"
torch.manual_seed(0)
layers = []
for i in range(8):
    linear = torch.nn.Linear(16, 16)
    torch.nn.init.normal_(linear.weight, 0.0, 0.05)
    layers += [linear, torch.nn.Tanh()]
model = torch.nn.Sequential(*layers)
reporter = WandbReporter()
watcher = gradwatch.watch(model, every_n_steps=5, reporters=[reporter])
for _ in range(40):
    model(torch.randn(32, 16)).pow(2).mean().backward()
    watcher.step()
watcher.close()
run.finish()
assert any(f.code == "GW101" for f in watcher.findings)
assert reporter.alerts_sent == 0 and not reporter.active, reporter.disabled
assert "disabled" in reporter.disabled and watcher.disabled == {}
print("ok")
"""


def test_wandb_mode_disabled_makes_the_reporter_do_nothing(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_DIR": str(tmp_path)}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", DISABLED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert not list(tmp_path.rglob("*.wandb"))


def test_example_runs_offline(tmp_path):
    script = ROOT / "examples" / "wandb_alerts.py"
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WANDB_MODE", None)
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    written = [line for line in out.stdout.splitlines() if line.strip().endswith(".wandb")]
    assert written, out.stdout
    sync_file = Path(written[-1].split()[-1])
    assert tmp_path in sync_file.parents
    log = read_run_log(sync_file)
    assert any(a.title == "GW101 vanishing-gradient" for a in log.alerts)
    assert "gradwatch/grad_rms/0" in log.keys("gradwatch/")
    assert "finding: GW101 vanishing-gradient [warning]" in out.stdout


def test_deferred_statistics_keep_their_own_step(tmp_path):
    """On a GPU the statistics are read one monitored step later (deferred=True does the
    same on the CPU): they land in a later row, and gradwatch/step still names their step."""
    torch.manual_seed(0)
    run = offline_run(tmp_path, "deferred")
    model = mlp(3, nn.ReLU, init="kaiming")
    recorder = Recorder()
    watcher = gradwatch.watch(
        model, every_n_steps=EVERY, deferred=True, reporters=[WandbReporter(run), recorder]
    )
    train_logging(model, watcher, run, steps=60, style="after")
    watcher.close()  # reads the last statistics still in flight
    sync_file = run.settings.sync_file
    run.finish()
    log = read_run_log(sync_file)
    rows = log.rows_with("gradwatch/step")
    assert [row["gradwatch/step"] for row in rows] == list(range(0, 60, EVERY))
    for row in rows:
        step = row["gradwatch/step"]
        assert row.step > step  # read later, so written into a later row
        expected = recorder.stats[step].layers["0"].grad_rms
        assert row["gradwatch/grad_rms/0"] == pytest.approx(expected, rel=1e-12)
    assert [row.step for row in log.rows_with("loss")] == list(range(60))
