"""The first hour of a new user: mistakes caught at the call that made them, a cell run
twice, logging configured the ordinary way. Real (small) training runs."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradwatchWarning

from .support import mlp, train


def _deep_sigmoid() -> nn.Sequential:
    return mlp(12, nn.Sigmoid, width=32)


# -- options: explicit, and a misspelling answered with the closest name ----------------


def test_a_misspelled_watch_option_suggests_the_closest_name():
    model = mlp(3)
    typo = r"has no option 'every_n_step'; did you mean 'every_n_steps'\?"
    with pytest.raises(TypeError, match=typo) as error:
        gradwatch.watch(model, every_n_step=5)
    assert "Watcher" not in str(error.value) and "__init__" not in str(error.value)
    with pytest.raises(TypeError, match="did you mean 'thresholds'"):
        gradwatch.Watcher(model, treshold={})
    gradwatch.watch(model, reporters=[]).close()  # the failed calls left nothing behind


def test_watch_options_are_visible_to_help_and_ides():
    import inspect

    names = set(inspect.signature(gradwatch.watch).parameters)
    assert {"every_n_steps", "select", "thresholds", "optimizer", "scaler", "sentinel"} <= names
    assert not any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(gradwatch.watch).parameters.values()
    )


def test_an_optimizer_class_or_a_model_is_refused_with_what_to_pass():
    model = mlp(3)
    with pytest.raises(ValueError, match=r"optimizer instance, e\.g\. torch\.optim\.SGD\(model"):
        gradwatch.watch(model, optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="got a model"):
        gradwatch.watch(model, optimizer=model)
    watcher = gradwatch.watch(model, reporters=[])
    with pytest.raises(ValueError, match="not the class Adam"):
        watcher.step(optimizer=torch.optim.Adam)
    watcher.close()


def test_a_loss_that_is_not_one_number_is_refused_at_the_call():
    model = mlp(3)
    with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
        out = model(torch.randn(8, 64))
        labels = torch.zeros(8, dtype=torch.long)
        per_sample = nn.functional.cross_entropy(out, labels, reduction="none")
        per_sample.mean().backward()
        with pytest.raises(ValueError, match="must be a number or a one-element tensor"):
            watcher.step(loss="high")
        with pytest.raises(ValueError, match=r"shape \(8,\)"):
            watcher.step(loss=per_sample)
        assert watcher.step(loss=per_sample.mean()) == []
        assert watcher.latest is not None and watcher.latest.loss == pytest.approx(
            float(per_sample.mean().detach())
        )


def test_step_after_close_warns_once():
    model = mlp(3)
    watcher = gradwatch.watch(model, reporters=[])
    watcher.close()
    with pytest.warns(GradwatchWarning, match="after close") as seen:
        watcher.step()
        watcher.step()
    assert len([w for w in seen if "after close" in str(w.message)]) == 1


def test_lightning_callback_options_are_checked_with_suggestions():
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    typo = r"GradWatchCallback\(\) has no option 'stop_at'; did you mean 'stop_on'"
    with pytest.raises(TypeError, match=typo):
        GradWatchCallback(stop_at="error")
    with pytest.raises(ValueError, match=r"stop_on must be a severity .* got True"):
        GradWatchCallback(stop_on=True)
    with pytest.raises(ValueError, match="sentinel must be True or False"):
        GradWatchCallback(sentinel="yes")


def test_transformers_callback_options_are_checked_with_suggestions():
    pytest.importorskip("transformers")
    from gradwatch.integrations.transformers import GradWatchCallback

    with pytest.raises(TypeError, match="did you mean 'log_layers'"):
        GradWatchCallback(log_layer=3)
    with pytest.raises(ValueError, match="stop_on must be"):
        GradWatchCallback(stop_on=1)


def test_lightning_callback_sentinel_false_checks_only_monitored_steps():
    """With ``sentinel=False`` a NaN at a step between monitored ones waits for the next
    monitored step; with the default it is measured at that very step."""
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    from .dist_scripts.lit_models import digits_loader, healthy, quiet_trainer

    def first_nan_step(**options) -> int:
        module = healthy()
        original = module.training_step

        def poisoned(batch, batch_idx):
            loss = original(batch, batch_idx)
            return loss * float("nan") if batch_idx == 3 else loss

        module.training_step = poisoned
        callback = GradWatchCallback(every_n_steps=10, reporters=[], log_stats=False, **options)
        quiet_trainer(max_steps=12, callbacks=[callback], logger=False).fit(module, digits_loader())
        return min(f.step for f in callback.findings if f.code == "GW103")

    assert first_nan_step() == 3
    assert first_nan_step(sentinel=False) == 10


# -- a notebook cell run twice -------------------------------------------------------------


def test_a_cell_run_twice_replaces_the_watcher_in_one_line(capsys):
    model = _deep_sigmoid()
    namespace = {"gradwatch": gradwatch, "model": model}
    cell = "watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])"
    exec(cell, namespace)
    first = namespace["watcher"]
    with pytest.warns(GradwatchWarning, match="was already watched") as seen:
        exec(cell, namespace)
    assert len(seen) == 1
    assert first.closed and not namespace["watcher"].closed
    train(model, namespace["watcher"], steps=2)
    namespace["watcher"].close()


# -- logging configured the ordinary way ------------------------------------------------------


@pytest.fixture
def root_handlers():
    root = logging.getLogger()
    before = list(root.handlers), root.level
    yield root
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def test_basic_config_does_not_print_each_finding_twice(root_handlers, tmp_path, capsys):
    console = logging.StreamHandler(sys.stderr)  # what basicConfig(level=INFO) installs
    console.setFormatter(logging.Formatter("LOGGED %(message)s"))
    log_file = tmp_path / "train.log"
    to_file = logging.FileHandler(log_file)
    root_handlers.addHandler(console)
    root_handlers.addHandler(to_file)
    root_handlers.setLevel(logging.INFO)
    model = _deep_sigmoid()
    watcher = gradwatch.watch(model, every_n_steps=5)  # default reporters
    train(model, watcher, steps=20)
    with pytest.warns(GradwatchWarning):
        watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])  # the cell again
    watcher.close()
    to_file.close()
    err = capsys.readouterr().err
    assert "GW101 vanishing-gradient" in err  # the terminal reporter
    assert not [line for line in err.splitlines() if line.startswith("LOGGED") and "GW101" in line]
    logged = log_file.read_text()
    assert logged.count("GW101 vanishing-gradient at step") == 1  # the log file has it
    # the notice of a second watch(): shown as a warning, logged to the file, not twice
    assert not [line for line in err.splitlines() if line.startswith("LOGGED")]
    assert logged.count("was already watched") == 1


# -- advice in the user's framework ------------------------------------------------------------


def _clip_hint(findings) -> str:
    hints = [f.hint for f in findings if f.code == "GW102"]
    assert hints, [f.code for f in findings]
    return hints[0]


def test_plain_pytorch_is_told_clip_grad_norm_():
    torch.manual_seed(0)
    model = mlp(4, width=32)
    watcher = gradwatch.watch(model, every_n_steps=2, reporters=[])
    train(model, watcher, steps=6, lr=5.0)
    watcher.close()
    hint = _clip_hint(watcher.findings)
    assert "torch.nn.utils.clip_grad_norm_(model.parameters()" in hint
    assert "Lightning" not in hint and "max_grad_norm" not in hint


def test_lightning_is_told_gradient_clip_val():
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    from .dist_scripts.lit_models import Classifier, digits_loader, quiet_trainer

    torch.manual_seed(0)
    callback = GradWatchCallback(every_n_steps=2, reporters=[], log_stats=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[callback], logger=False)
    trainer.fit(Classifier(mlp(4, width=32), lr=5.0), digits_loader())
    hint = _clip_hint(callback.findings)
    assert "Trainer(gradient_clip_val=1.0)" in hint and "clip_grad_norm_" not in hint


def test_transformers_trainer_is_told_max_grad_norm(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from gradwatch.integrations.transformers import GradWatchCallback

    from .dist_scripts.hf_models import digit_data, trainer_args

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, width=32)

        def forward(self, x, labels):
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    torch.manual_seed(0)
    callback = GradWatchCallback(every_n_steps=2, reporters=[], log_stats=False)
    args = trainer_args(
        tmp_path,
        max_steps=7,
        optim="sgd",
        learning_rate=5.0,
        lr_scheduler_type="constant",
        max_grad_norm=0,  # clipping switched off: the advice is to switch it on
        per_device_train_batch_size=64,
    )
    Trainer(model=Net(), args=args, train_dataset=digit_data(), callbacks=[callback]).train()
    hint = _clip_hint(callback.findings)
    assert "TrainingArguments(max_grad_norm=1.0)" in hint
    assert "gradient_clip_val" not in hint and "clip_grad_norm_" not in hint


def test_accelerate_is_told_accelerator_clip_grad_norm_():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = mlp(4, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    watcher = gradwatch.watch(
        accelerator.unwrap_model(prepared), every_n_steps=2, reporters=[], optimizer=optimizer
    )
    assert watcher.framework == "accelerate"
    from .support import digits

    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(prepared(x[idx]), y[idx])
        accelerator.backward(loss)
        watcher.step()
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    assert "accelerator.clip_grad_norm_(model.parameters(), 1.0)" in _clip_hint(watcher.findings)


# -- the user's own numbers and causes ------------------------------------------------------------


def _first(findings, code):
    return next(f for f in findings if f.code == code and f.status == "new")


def _tanh_net_with_xavier_init() -> nn.Sequential:
    """12 tanh layers with the recommended init (xavier, gain 5/3): healthy at first; a
    learning rate far too high saturates it during training."""
    torch.manual_seed(0)
    model = mlp(12, nn.Tanh, width=32)
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(layer.bias)
    return model


@pytest.mark.parametrize("depth", [12, 20])
def test_vanishing_hint_quotes_the_users_own_depth(depth):
    torch.manual_seed(0)
    model = mlp(depth, nn.Sigmoid, width=32)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    train(model, watcher, steps=15)
    watcher.close()
    hint = _first(watcher.findings, "GW101").hint
    n = depth - 1  # sigmoids between the Linear layers
    assert f"{n} here: at most 0.25^{n} ~ {0.25**n:.1e}" in hint
    assert "0.25^30" not in hint and "8.7e-19" not in hint


def test_vanishing_that_appears_during_training_blames_training_not_init():
    """A tanh net with the recommended init (xavier, gain 5/3) passes the gradient at
    first; a learning rate far too high saturates it later."""
    model = _tanh_net_with_xavier_init()
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    train(model, watcher, steps=45, lr=2.0)
    watcher.close()
    finding = _first(watcher.findings, "GW101")
    assert finding.step > 10  # the first monitored steps were healthy
    assert "collapsed during training" in finding.hint and "lr=2" in finding.hint
    assert "xavier" not in finding.hint and "kaiming" not in finding.hint


def test_vanishing_from_the_start_still_advises_the_init():
    torch.manual_seed(0)
    model = mlp(12, nn.Tanh, std=0.05, width=32)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    train(model, watcher, steps=15)
    watcher.close()
    hint = _first(watcher.findings, "GW101").hint
    assert "xavier" in hint and "during training" not in hint


# -- NaN: where it begins, said in the user's names ------------------------------------------


def _nan_at(step: int):
    def poison(batch_step: int, x: torch.Tensor) -> torch.Tensor:
        if batch_step == step:
            x = x.clone()
            x[0, 0] = float("nan")
        return x

    return poison


def _loop(model, watcher, steps, *, poison=None, skip_nonfinite=True):
    from .support import digits

    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        batch = x[step * 32 : step * 32 + 32]
        if poison is not None:
            batch = poison(step, batch)
        loss = nn.functional.cross_entropy(model(batch), y[step * 32 : step * 32 + 32])
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss.detach())
        if not skip_nonfinite or torch.isfinite(loss):
            opt.step()


def test_nan_in_the_root_module_names_it_root_and_the_next_clean_pass_is_reported():
    model = nn.Linear(64, 10)  # the model is itself the only layer: its name is ""
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    _loop(model, watcher, 12, poison=_nan_at(3))
    watcher.close()
    nan = _first(watcher.findings, "GW103")
    assert nan.step == 3 and "(first layer <root>)" in nan.message
    follow = [f for f in watcher.findings if f.evidence.get("nonfinite_step") == 3]
    assert len(follow) == 1 and follow[0].step == 5 and follow[0].severity == "info"
    assert "was finite in every module" in follow[0].message


class _BreaksAfter(nn.Module):
    """Takes the log of its input from its ``after``-th call on: NaN for negative inputs."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.calls += 1
        return (torch.log(x) if self.calls > self.after else x) * self.scale


def test_nan_follow_up_names_the_module_whose_output_breaks():
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), _BreaksAfter(3), nn.Linear(32, 10))
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    _loop(model, watcher, 8)
    watcher.close()
    assert _first(watcher.findings, "GW103").step == 3
    follow = next(f for f in watcher.findings if f.evidence.get("nonfinite_step") == 3)
    assert follow.step == 5 and follow.layers[0] == "2"
    assert "begins in the forward output of 2 (_BreaksAfter)" in follow.message


def test_dead_units_of_a_gelu_net_are_called_gelu_and_gelu_is_not_advised():
    torch.manual_seed(0)
    model = mlp(5, nn.GELU, width=32)
    with torch.no_grad():
        model[4].bias.fill_(-30.0)  # GELU(x) and its derivative are exactly 0 down there
    watcher = gradwatch.watch(model, every_n_steps=3, reporters=[])
    train(model, watcher, steps=12)
    watcher.close()
    finding = _first(watcher.findings, "GW201")
    assert "dead GELU units" in finding.message and "ReLU" not in finding.message
    assert "LeakyReLU" in finding.hint and "GELU" not in finding.hint.replace("LeakyReLU", "")


def test_dead_units_of_a_relu_net_are_still_called_relu():
    from .zoo import relu_with_dead_layer

    model = relu_with_dead_layer()
    watcher = gradwatch.watch(model, every_n_steps=3, reporters=[])
    train(model, watcher, steps=12)
    watcher.close()
    finding = _first(watcher.findings, "GW201")
    assert "dead ReLU units" in finding.message and "LeakyReLU/GELU" in finding.hint


# -- fp16 without the scaler ----------------------------------------------------------------------


def _fp16_run(pass_scaler: bool, steps: int = 8):
    """fp16 autocast (on the CPU) with a GradScaler whose first scales overflow."""
    from .support import digits

    torch.manual_seed(0)
    model = mlp(3, width=32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(
        model, every_n_steps=4, reporters=[], scaler=scaler if pass_scaler else None
    )
    x, y = digits()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x[step * 32 : step * 32 + 32]), y[:32])
        scaler.scale(loss).backward()
        watcher.step(loss=loss.detach())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    watcher.close()
    return watcher


def test_fp16_without_the_scaler_says_to_pass_it_and_is_no_error():
    watcher = _fp16_run(pass_scaler=False)
    nan = _first(watcher.findings, "GW103")
    assert nan.step == 0 and nan.severity == "warning"
    assert "scaler=scaler" in nan.hint and "calibrates" in nan.hint
    assert not [f for f in watcher.findings if f.code == "GW103" and f.severity == "error"]


def test_fp16_with_the_scaler_passed_is_silent_while_it_calibrates():
    watcher = _fp16_run(pass_scaler=True)
    assert not [f for f in watcher.findings if f.code == "GW103"]


def test_bf16_autocast_is_not_taken_for_fp16():
    from gradwatch.precision import AutocastProbe

    model = mlp(2)
    seen = []
    AutocastProbe(model, lambda: seen.append(True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 64))
    assert seen == []


def test_an_attention_call_with_nothing_unmasked_is_no_largest_logit_of_zero():
    """GW203's evidence series showed a stray 0: a call whose sampled rows held no
    unmasked logit was read as a largest |logit| of 0. It is "not measured" now."""
    import math

    from gradwatch.attention_sample import AttentionCall, pack, read_back

    def call(sample):
        return AttentionCall("attn", "", "softmax", keys=2, rows=len(sample), depth=None,
                             sample=sample)

    masked = torch.full((4, 2), -math.inf)
    sums, maxima, calls = pack([call(masked)])
    stats = read_back(calls, torch.cat(sums).tolist(), torch.cat(maxima).tolist())
    assert stats["attn"].max_logit is None
    sums, maxima, calls = pack([call(masked), call(torch.tensor([[40.0, 1.0]]))])
    stats = read_back(calls, torch.cat(sums).tolist(), torch.cat(maxima).tolist())
    assert stats["attn"].max_logit == 40.0


# -- records: refused when built, read back strictly --------------------------------------------


def test_jsonl_recorder_on_a_folder_or_under_a_file_is_refused_when_built(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        gradwatch.JsonlRecorder(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, so no folder can be made there"):
        gradwatch.JsonlRecorder(blocker / "runs" / "run.jsonl")
    recorder = gradwatch.JsonlRecorder(tmp_path / "new" / "run.jsonl")  # made at first write
    recorder.close([])
    assert gradwatch.read_record(tmp_path / "new" / "run.jsonl").summary == []


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root may write anywhere",
)
def test_jsonl_recorder_in_a_read_only_folder_is_refused_when_built(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            gradwatch.JsonlRecorder(locked / "run.jsonl")
    finally:
        locked.chmod(0o700)


def test_read_record_refuses_a_file_that_is_not_a_record(tmp_path):
    other = tmp_path / "metrics.jsonl"
    other.write_text('{"loss": 0.3}\n{"loss": 0.2}\n')
    with pytest.raises(ValueError, match="has no gradwatch lines"):
        gradwatch.read_record(other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        gradwatch.read_record(empty)


# -- unusual but real setups ----------------------------------------------------------------------


def test_lightning_fabric_module_is_unwrapped_and_fabric_advice_given():
    fabric_mod = pytest.importorskip("lightning.fabric")
    from .support import digits

    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = mlp(4, width=32)
    module, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=5.0))
    watcher = gradwatch.watch(
        module, optimizer=optimizer, every_n_steps=2, reporters=[], exclude=["6"]
    )
    assert watcher.module is model and watcher.framework == "fabric"
    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        fabric.backward(nn.functional.cross_entropy(module(x[idx]), y[idx]))
        watcher.step()
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    names = set(watcher.latest.layers)
    assert "0" in names and "6" not in names  # the model's own names; exclude= works
    assert not any(name.startswith("_forward_module") for name in names)
    assert "fabric.clip_gradients(model, optimizer, max_norm=1.0)" in _clip_hint(watcher.findings)
    assert gradwatch.release(module) is False  # unwrapped there too: nothing left open


class _FailsOnce(nn.Module):
    """Raises (like an out-of-memory error) at its ``when``-th call, half-way through."""

    def __init__(self, when: int) -> None:
        super().__init__()
        self.when, self.calls = when, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.when:
            raise RuntimeError("CUDA out of memory (simulated)")
        return x


@pytest.mark.parametrize("every_n_steps", [1, 2])  # detail and core statistics
def test_a_forward_pass_aborted_by_an_exception_leaves_nothing_in_the_step(every_n_steps):
    from .support import digits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), _FailsOnce(when=3), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = gradwatch.watch(model, every_n_steps=every_n_steps, detail_every=1, reporters=[])
    x, y = digits()
    good = {}
    for step in range(4):
        for attempt in range(2):
            batch = x[(step * 2 + attempt) * 16 :][:16]
            try:
                loss = nn.functional.cross_entropy(model(batch), y[:16])
            except RuntimeError:
                continue  # skip the batch, as out-of-memory recovery does
            good[step] = batch
            break
        if step == 2:
            with torch.no_grad():
                rms_at_step_2 = model[0](good[2]).pow(2).mean().sqrt().item()
        opt.zero_grad()
        loss.backward()
        watcher.step()
        opt.step()
    watcher.close()
    # Call 3 (step 2, first attempt) failed after the first Linear and the ReLU had run.
    stats = next(s for s in watcher.history if s.step == 2)
    assert stats.layers["1"].calls == 1  # the ReLU is counted once, not twice
    assert stats.layers["0"].output_rms is not None
    # the Linear's output RMS is that of the batch that went through, at its weights then
    assert stats.layers["0"].output_rms == pytest.approx(rms_at_step_2, rel=1e-4)


class _Distilled(nn.Module):
    """A student trained towards a frozen teacher's outputs, both inside one module."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = mlp(3, nn.ReLU, width=32).requires_grad_(False)
        self.student = mlp(2, nn.ReLU, width=16)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
        return self.student(x), target


def test_a_frozen_teacher_is_not_listed_as_layers_without_numbers(tmp_path):
    from .support import digits

    model = _Distilled()
    path = tmp_path / "run.jsonl"
    watcher = gradwatch.watch(
        model, every_n_steps=1, reporters=[gradwatch.JsonlRecorder(path)]
    )
    opt = torch.optim.SGD(model.student.parameters(), lr=0.05)
    x, _ = digits()
    for step in range(3):
        out, target = model(x[step * 32 : step * 32 + 32])
        loss = nn.functional.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        watcher.step()
        opt.step()
    watcher.close()
    assert [layer.name for layer in watcher.layers] == [
        "student.0", "student.1", "student.2"
    ]
    recorded = gradwatch.read_record(path).steps[-1].layers
    assert not [name for name in recorded if name.startswith("teacher")]
    assert all(recorded[name].grad_norm is not None for name in ("student.0", "student.2"))
    assert not watcher.findings  # a healthy student, and no missing-gradient alarm


# -- gradwatch/findings/<code>: the problems active at the step ------------------------------------


def test_findings_metric_is_the_active_state_and_drops_to_zero_once_resolved():
    from gradwatch.integrations._callback import MetricsBuffer, finding_counts

    model = _tanh_net_with_xavier_init()
    holder: dict = {}
    buffer = MetricsBuffer(counts=lambda: finding_counts(holder["watcher"]))
    watcher = holder["watcher"] = gradwatch.watch(model, every_n_steps=5, reporters=[buffer])
    logged = {}

    def log_row(step: int) -> None:
        measured = buffer.pending_step
        if measured is not None:
            logged[measured] = buffer.take()

    train(model, watcher, steps=36, lr=5.0, before_step=log_row)
    watcher.close()
    exploding = [f for f in watcher.findings if f.code == "GW102"]
    resolved = next(f.step for f in exploding if f.status == "resolved")
    started = min(f.step for f in exploding if f.status == "new")
    series = {step: row["gradwatch/findings/GW102"] for step, row in logged.items()}
    assert series[min(series)] == 0.0
    assert all(v >= 1.0 for s, v in series.items() if started <= s < resolved)
    assert series[resolved] == 0.0  # the problem cleared: no longer 1


def test_saturation_that_appears_during_training_blames_training_not_init():
    model = _tanh_net_with_xavier_init()
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    train(model, watcher, steps=25, lr=2.0)
    watcher.close()
    finding = _first(watcher.findings, "GW202")
    assert "saturated tanh outputs" in finding.message and "1 (Tanh)" in finding.message
    assert "saturated during training" in finding.hint and "xavier" not in finding.hint
