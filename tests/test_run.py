"""``gradwatch run script.py``: unmodified scripts, each in a process of its own, and the
attachment (optimizer hook, model finding) in this process."""

from __future__ import annotations

import gc
import json
import re

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.attach import Attachment
from gradwatch.trained import optimizer_parameters, trained_models

from .run_scripts import (
    DEEP_SIGMOID,
    GAN,
    HEALTHY,
    RAISES,
    SELF_REPORT,
    gradwatch_run,
    python,
    script,
)

FINDING_CODE = re.compile(r"\bGW\d{3}\b")


@pytest.mark.slow
def test_vanishing_gradient_is_found_and_the_scripts_exit_code_kept(tmp_path):
    script(tmp_path, DEEP_SIGMOID)
    proc = gradwatch_run(
        tmp_path, "--record", "runs/deep.jsonl", "--tensorboard", "tb", "train.py", "3"
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    assert "watching Sequential (21 layers with parameters), trained by SGD" in err
    assert "GW101 vanishing-gradient" in err
    # the summary comes after the findings, before the process ends
    assert err.rindex("gradwatch summary") > err.index("GW101 vanishing-gradient")
    assert "the script's finally block ran" in proc.stdout
    record = gradwatch.read_record(tmp_path / "runs" / "deep.jsonl")
    assert record.meta == {"model": "Sequential", "script": "train.py"}
    assert [f.code for f in record.findings if f.status == "new"] == ["GW101"]
    assert "0" in record.findings[0].layers
    # the optimizer's second step (the first is where the model is found), then every 15th
    assert [s.step for s in record.steps] == [1, 15, 30, 45]
    assert record.summary and record.summary[0].code == "GW101"
    # the same steps in TensorBoard's event files, read back with its own reader
    from .test_tensorboard import events, texts

    tb = events(tmp_path / "tb")
    assert [e.step for e in tb.Scalars("gradwatch/grad_rms/0")] == [1, 15, 30, 45]
    assert any("GW101" in text for _, text in texts(tb, "gradwatch/findings"))


@pytest.mark.slow
def test_a_healthy_script_is_silent_and_a_teacher_is_not_watched(tmp_path):
    script(tmp_path, HEALTHY)
    proc = gradwatch_run(tmp_path, "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 60" in proc.stdout
    assert not FINDING_CODE.search(proc.stderr), proc.stderr
    assert proc.stderr.count("gradwatch: watching") == 1
    assert "watching Student (4 layers with parameters), trained by Adam" in proc.stderr
    assert "gradwatch summary: no findings" in proc.stderr


@pytest.mark.slow
def test_an_exception_keeps_its_traceback_and_exit_code_and_the_summary_is_printed(tmp_path):
    script(tmp_path, RAISES)
    alone = python(tmp_path, "train.py")
    proc = gradwatch_run(tmp_path, "train.py")
    assert alone.returncode == proc.returncode == 1
    traceback = proc.stderr[proc.stderr.index("Traceback") :]
    # the script's own frames, nothing of gradwatch or runpy
    assert traceback == alone.stderr[alone.stderr.index("Traceback") :]
    assert traceback.rstrip().endswith("RuntimeError: the data loader broke at step 5")
    assert proc.stderr.index("gradwatch summary") < proc.stderr.index("Traceback")


@pytest.mark.slow
def test_sys_exit_and_argv_file_and_path_are_those_of_python_script_py(tmp_path):
    script(tmp_path, SELF_REPORT, name="report_self.py")
    args = ["report_self.py", "--lr", "0.1", "-h", "data dir"]
    python(tmp_path, *args, SELF_REPORT=str(tmp_path / "alone.json"))
    proc = gradwatch_run(tmp_path, *args, SELF_REPORT=str(tmp_path / "run.json"))
    assert proc.returncode == 0, proc.stderr
    alone = json.loads((tmp_path / "alone.json").read_text())
    ran = json.loads((tmp_path / "run.json").read_text())
    assert ran["argv"][1:] == alone["argv"][1:] == ["--lr", "0.1", "-h", "data dir"]
    assert ran["argv"][0] == str(tmp_path / "report_self.py")  # absolute, like __file__
    for key in ("file", "name", "path0", "main_file"):
        assert ran[key] == alone[key], key


@pytest.mark.slow
def test_a_gan_gets_a_watcher_per_model_and_findings_name_the_generator(tmp_path):
    script(tmp_path, GAN)
    proc = gradwatch_run(tmp_path, "--record", "gan.jsonl", "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "watching Discriminator (3 layers with parameters), trained by Adam" in err
    assert "watching Generator (18 layers with parameters), trained by Adam" in err
    # the finding is announced under the generator's name
    named = err.index("gradwatch: in Generator:")
    assert err.index("GW101 vanishing-gradient") > named
    assert "in Discriminator" not in err
    discriminator = gradwatch.read_record(tmp_path / "gan.jsonl")
    generator = gradwatch.read_record(tmp_path / "gan.Generator.jsonl")
    assert discriminator.meta["model"] == "Discriminator" and not discriminator.findings
    # both watched to the end (the optimizers are a running function's locals)
    assert [s.step for s in discriminator.steps] == [s.step for s in generator.steps]
    assert [s.step for s in discriminator.steps] == [1, 15, 30, 45]
    assert generator.meta["model"] == "Generator"
    assert [f.code for f in generator.findings] == ["GW101"]
    assert "net.0" in generator.findings[0].layers


@pytest.mark.slow
def test_stop_on_ends_the_loop_with_the_reason_and_the_scripts_finally_blocks_run(tmp_path):
    script(tmp_path, DEEP_SIGMOID, steps=200)
    proc = gradwatch_run(tmp_path, "--stop-on", "GW101", "--every", "5", "train.py")
    assert proc.returncode == 1
    assert "the script's finally block ran" in proc.stdout
    assert re.search(r"gradwatch stopped training at step \d+ \(stop_on=GW101\)", proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wrong_options_are_refused_before_the_script_runs(tmp_path):
    script(tmp_path, HEALTHY)
    proc = gradwatch_run(tmp_path, "--select", "GW999", "train.py")
    assert proc.returncode == 2
    assert "GW999" in proc.stderr and "trained" not in proc.stdout


# -- in this process: which models an optimizer trains ---------------------------------


def _train(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    for _ in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        for optimizer in optimizers:
            optimizer.step()


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_a_compiled_model_is_watched_through_its_wrapper():
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        pytest.warns(gradwatch.GradwatchWarning, match="compile"),
        Attachment(every_n_steps=2, reporters=lambda m: []) as attachment,
    ):
        _train(compiled, [optimizer], 5)
        (watcher,) = attachment.watchers
        assert watcher.module is model
        assert [s.step for s in watcher.history] == [1, 2, 4]


def test_a_ddp_model_is_watched_unwrapped(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        with Attachment(every_n_steps=2, reporters=lambda m: []) as attachment:
            _train(ddp, [optimizer], 3)
            (watcher,) = attachment.watchers
            assert watcher.module is model
            assert watcher.latest.layers["0"].grad_norm > 0
    finally:
        # DDP's reducer goes before its process group: freed after it, gloo's destructor
        # can wait forever on its worker thread.
        ddp = optimizer = attachment = watcher = None
        gc.collect()
        dist.destroy_process_group()


def test_optimizers_that_split_each_layer_share_one_watcher_of_the_whole_model():
    model = _mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    first, second = torch.optim.SGD(weights, lr=0.01), torch.optim.Adam(biases)
    assert trained_models(optimizer_parameters(first), model.modules()) == [model]
    with Attachment(every_n_steps=1, reporters=lambda m: []) as attachment:
        _train(model, [first, second], 4)
        (watcher,) = attachment.watchers
        # stepped by the first optimizer only: one measurement per training step
        assert [s.step for s in watcher.history] == [1, 2, 3]


def test_a_model_the_script_watches_itself_is_left_to_its_watcher():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    own = gradwatch.watch(model, reporters=[])
    with Attachment(reporters=lambda m: []) as attachment:
        _train(model, [optimizer], 3)
        assert attachment.watchers == []
    own.close()


def test_a_failure_while_finding_the_model_never_reaches_training(monkeypatch):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def broken(parameters):
        raise RuntimeError("simulated")

    monkeypatch.setattr("gradwatch.attach.trained_models", broken)
    with (
        pytest.warns(gradwatch.GradwatchWarning, match="finding the model failed"),
        Attachment(reporters=lambda m: []) as attachment,
    ):
        _train(model, [optimizer], 3)
    assert attachment.watchers == []


# -- Trainers: the callback is added to the Trainer the script builds ---------------------


@pytest.mark.slow
def test_a_lightning_script_gets_the_callback_and_its_csv_log_the_metrics(tmp_path):
    pytest.importorskip("lightning")
    import csv

    from .run_scripts import LIGHTNING

    script(tmp_path, LIGHTNING, steps=45)
    proc = gradwatch_run(tmp_path, "--record", "lit.jsonl", "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "callbacks: GradWatchCallback" in proc.stdout
    assert "watching the Lightning Trainer's model with GradWatchCallback" in proc.stderr
    assert "gradwatch: watching LightningModule" not in proc.stderr  # not twice
    assert "GW101 vanishing-gradient" in proc.stderr
    rows = list(csv.DictReader((tmp_path / "logs/deep/version_0/metrics.csv").open()))
    logged = [row for row in rows if row.get("gradwatch/global_grad_norm")]
    assert [int(row["step"]) for row in logged] == [14, 29, 44]
    assert float(logged[-1]["gradwatch/findings/GW101"]) == 1.0
    record = gradwatch.read_record(tmp_path / "lit.jsonl")
    assert [f.code for f in record.findings] == ["GW101"]


@pytest.mark.slow
def test_a_transformers_trainer_script_gets_the_callback_and_its_log_rows_the_metrics(tmp_path):
    pytest.importorskip("transformers")
    from .run_scripts import TRANSFORMERS

    script(tmp_path, TRANSFORMERS, steps=45)
    proc = gradwatch_run(tmp_path, "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("GradWatchCallback") == 1
    assert "watching the Transformers Trainer's model with GradWatchCallback" in proc.stderr
    assert "gradwatch: watching Deep" not in proc.stderr
    assert "GW101 vanishing-gradient" in proc.stderr
    rows = [r for r in json.loads((tmp_path / "log_history.json").read_text()) if "loss" in r]
    assert [r["step"] for r in rows] == [15, 30, 45]
    for row in rows:  # gradwatch's norm of the step, before clipping: the Trainer's own
        assert row["gradwatch/global_grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
    assert rows[-1]["gradwatch/findings/GW101"] == 1.0


@pytest.mark.slow
def test_an_accelerate_loop_is_watched_through_the_optimizer_hook_at_real_steps(tmp_path):
    pytest.importorskip("accelerate")
    from .run_scripts import ACCELERATE

    script(tmp_path, ACCELERATE)
    proc = gradwatch_run(tmp_path, "--record", "acc.jsonl", "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer: AcceleratedOptimizer" in proc.stdout
    assert "watching Sequential (21 layers with parameters), trained by SGD" in proc.stderr
    record = gradwatch.read_record(tmp_path / "acc.jsonl")
    # 96 micro-batches, 2 per optimizer step: 48 real steps, counted 0..47
    assert [s.step for s in record.steps] == [1, 15, 30, 45]
    assert [f.code for f in record.findings] == ["GW101"]


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_every_rank_measures_and_rank_0_reports(tmp_path):
    import subprocess
    import sys

    from .run_scripts import DDP, environment

    script(tmp_path, DDP, steps=50)
    env = environment(tmp_path, CUDA_VISIBLE_DEVICES="")
    env.pop("MASTER_PORT", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*launch, "-m", "gradwatch", "run", "--record", "ddp.jsonl", "train.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.count("done") == 2, proc.stderr[-3000:]  # both ranks ran to the end
    # torch 2.13's gloo sometimes aborts a process as it exits, after the script's last
    # line, with or without gradwatch ("terminate called without an active exception").
    exit_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or exit_abort, proc.stderr[-3000:]
    assert proc.stderr.count("gradwatch: watching Sequential") == 1
    assert proc.stderr.count("GW101 vanishing-gradient at step") == 1
    assert proc.stderr.count("gradwatch summary") == 1
    record = gradwatch.read_record(tmp_path / "ddp.jsonl")  # written by rank 0 alone
    assert [s.step for s in record.steps] == [1, 15, 30, 45]
    assert [f.code for f in record.findings] == ["GW101"]


@pytest.mark.slow
def test_wandb_option_reports_into_the_scripts_own_run(tmp_path):
    pytest.importorskip("wandb")
    from .run_scripts import WANDB
    from .wandb_log import read_run_log

    script(tmp_path, WANDB)
    proc = gradwatch_run(tmp_path, "--wandb", "train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [row for row in proc.stdout.splitlines() if row.startswith("sync file:")]
    log = read_run_log(tmp_path / line.split(":", 1)[1].strip())  # relative to the script
    # the script's 60 rows stay its own; gradwatch's values ride in them
    assert len(log.rows_with("loss")) == 60
    steps = [value for _, value in log.series("gradwatch/step")]
    assert steps[:4] == [1, 15, 30, 45]
    assert [a.title for a in log.alerts] == ["GW101 vanishing-gradient"]


def test_a_sweep_closes_each_finished_models_watcher_and_frees_the_model():
    import gc
    import weakref

    models: list[weakref.ref[nn.Module]] = []

    def trial() -> None:
        model = _mlp()
        models.append(weakref.ref(model))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
        for _ in range(3):
            _train(model, [optimizer], 1)
            scheduler.step()

    with Attachment(every_n_steps=1, reporters=lambda m: []) as attachment:
        trial()
        first = attachment.watchers[0]
        trial()  # its first step closes the first trial's watcher
        assert first.closed and [s.step for s in first.history] == [1, 2]
        (second,) = attachment.watchers
        assert not second.closed
        del first
        gc.collect()
        assert models[0]() is None  # freed
        # a model whose optimizer the script still holds stays watched
        model = _mlp()
        held = torch.optim.SGD(model.parameters(), lr=0.01)
        _train(model, [held], 2)
        trial()
        assert len(attachment.watchers) == 2 and held is not None


def test_a_closure_step_is_measured_after_its_closure_computed_the_gradients():
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    x = torch.randn(16, 8)
    seen: list[float] = []

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        first = model[0]  # the layer's gradient norm: weight and bias together
        seen.append(float(torch.cat([first.weight.grad.flatten(), first.bias.grad]).norm()))
        return loss

    with Attachment(every_n_steps=1, reporters=lambda m: []) as attachment:
        for _ in range(3):
            optimizer.step(closure)
        (watcher,) = attachment.watchers
        # the gradients the step's last closure call left, not the previous step's
        assert watcher.latest.step == 2
        assert watcher.latest.layers["0"].grad_norm == pytest.approx(seen[-1], rel=1e-5)


def test_a_trainer_that_starts_its_own_processes_gets_no_callback_that_would_wait_for_them(
    tmp_path, monkeypatch
):
    from gradwatch.cli import build_parser
    from gradwatch.run import RunOptions, _Session

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "train.py").write_text("")
    args = build_parser().parse_args(["run", "--every", "5", str(tmp_path / "train.py")])
    session = _Session(RunOptions(args))
    # one process: the callback, with the command line's options
    assert session._callback_options("Lightning", "LightningModule", 1)["every_n_steps"] == 5
    # Lightning's strategy="ddp" from a plain command: the other processes run without
    # gradwatch, so no callback and no statistics combined across ranks
    with pytest.warns(gradwatch.GradwatchWarning, match="torchrun --nproc-per-node=4 -m gradwatch"):
        assert session._callback_options("Lightning", "LightningModule", 4) is None
    assert session.options.watch_options()["sync"] is False
    # under torchrun every rank runs gradwatch: combined as usual
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert session._callback_options("Lightning", "LightningModule", 4) is not None
    assert "sync" not in session.options.watch_options()


@pytest.mark.slow
def test_a_module_runs_as_python_m_runs_it(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    script(tmp_path / "pkg", SELF_REPORT, name="report_self.py")
    python(tmp_path, "-m", "pkg.report_self", "--lr", "1", SELF_REPORT=str(tmp_path / "alone.json"))
    proc = gradwatch_run(
        tmp_path, "-m", "pkg.report_self", "--lr", "1", SELF_REPORT=str(tmp_path / "run.json")
    )
    assert proc.returncode == 0, proc.stderr
    alone = json.loads((tmp_path / "alone.json").read_text())
    ran = json.loads((tmp_path / "run.json").read_text())
    assert ran == alone
