"""Training is never broken by gradwatch, and bad input gets a clear error."""

import gc
import math
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradwatchWarning, Reporter

from .support import digits, hooks_of, mlp, train


def _watch(model, **kw):
    kw.setdefault("every_n_steps", 1)
    kw.setdefault("reporters", [])
    return gradwatch.watch(model, **kw)


def test_nested_modules_are_named_as_named_modules_gives_them():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(64, 32), nn.ReLU())

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(Block(), nn.Linear(32, 10))
    with _watch(model) as watcher:
        train(model, watcher, steps=2)
        names = set(watcher.latest.layers)
    assert {"0.inner.0", "0.inner.1", "1"} <= names


def test_module_called_twice_per_forward_adds_both_calls():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 32)
            self.shared = nn.Linear(32, 32)
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            h = torch.relu(self.shared(h))
            h = torch.relu(self.shared(h))
            return self.out(h)

    model = Shared()
    with _watch(model) as watcher:
        train(model, watcher, steps=2)
        shared = watcher.latest.layers["shared"]
    assert shared.calls == 2
    expected = float(torch.cat([p.grad.flatten() for p in model.shared.parameters()]).norm())
    assert math.isclose(shared.grad_norm, expected, rel_tol=1e-5)
    assert shared.output_grad_norm is not None and shared.output_grad_norm > 0
    order = [s.name for s in watcher.latest.by_depth(with_gradient=True)]
    assert order == ["inp", "shared", "out"]


def test_tuple_and_dict_outputs():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 32)

        def forward(self, x):
            h = self.lin(x)
            return h, h.detach().argmax(1)

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 10)

        def forward(self, x):
            return {"logits": self.lin(x), "aux": None}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = TupleOut(), DictOut()

        def forward(self, x):
            h, _ = self.a(x)
            return self.b(torch.relu(h))["logits"]

    model = Model()
    with _watch(model) as watcher:
        train(model, watcher, steps=2)
        stats = watcher.latest
    assert stats.layers["a.lin"].output_grad_norm > 0
    assert stats.layers["b.lin"].output_rms > 0


def test_inplace_relu_right_after_a_hooked_layer():
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 64), nn.ReLU(inplace=True),
        nn.Linear(64, 10),
    )
    reference = mlp(3, nn.ReLU)
    reference.load_state_dict(model.state_dict())
    with _watch(model, detail_every=1) as watcher:
        losses = train(model, watcher, steps=5)
        stats = watcher.latest
    plain = train(reference, None, steps=5)
    assert losses == pytest.approx(plain, rel=1e-6)  # training itself is untouched
    assert stats.layers["1"].active_units is not None
    assert stats.layers["0"].output_grad_norm > 0


def test_frozen_parameters_are_not_missing_gradients():
    model = mlp(4, nn.ReLU)
    for p in model[0].parameters():
        p.requires_grad_(False)
    with _watch(model) as watcher:
        train(model, watcher, steps=5)
        stats = watcher.latest
    assert "0" not in [s.name for s in stats.by_depth(with_gradient=True)]
    assert stats.missing == ()
    assert not [f for f in watcher.findings if f.code == "GW104"]


def test_parameters_whose_grad_stays_none_are_listed():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(64, 10)
            self.unused = nn.Linear(64, 10)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    with _watch(model) as watcher:
        train(model, watcher, steps=4)
        stats = watcher.latest
    assert set(stats.missing) == {"unused.weight", "unused.bias"}
    assert stats.layers["unused"].missing_grad == ("weight", "bias")


def test_gradient_accumulation_measures_the_accumulated_gradient():
    model = mlp(3, nn.ReLU)
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, detail_every=1) as watcher:
        opt.zero_grad()
        for micro in range(4):
            idx = slice(micro * 16, (micro + 1) * 16)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        watcher.step()
        stats = watcher.latest
    expected = float(torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm())
    assert math.isclose(stats.layers["0"].grad_norm, expected, rel_tol=1e-5)
    assert stats.layers["1"].calls == 4  # the ReLU saw every micro-batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_give_float32_statistics(dtype):
    model = mlp(3, nn.ReLU).to(dtype)
    x, y = digits()
    with _watch(model) as watcher:
        out = model(x[:32].to(dtype))
        nn.functional.cross_entropy(out.float(), y[:32]).backward()
        watcher.step()
        stats = watcher.latest
    grad = model[0].weight.grad.float()
    bias = model[0].bias.grad.float()
    expected = float(torch.sqrt(grad.pow(2).sum() + bias.pow(2).sum()))
    assert math.isclose(stats.layers["0"].grad_norm, expected, rel_tol=1e-3)
    assert isinstance(stats.layers["0"].grad_rms, float)


def test_ddp_wrapped_model_uses_the_inner_names(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(mlp(3, nn.ReLU))
        with _watch(model) as watcher:
            train(model, watcher, steps=3)
            names = [s.name for s in watcher.latest.by_depth(with_gradient=True)]
        assert names == ["0", "2", "4"]
    finally:
        # DDP's reducer goes before its process group: freed after it, gloo's destructor
        # can wait forever on its worker thread.
        model = watcher = None
        gc.collect()
        dist.destroy_process_group()


def test_compiled_model_does_not_crash_and_says_what_it_cannot_see():
    model = mlp(3, nn.ReLU)
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = _watch(compiled)
    assert any("torch.compile" in str(w.message) for w in caught)
    train(compiled, watcher, steps=3)
    stats = watcher.latest
    watcher.close()
    assert stats.layers["0"].grad_norm > 0
    assert stats.layers["0"].zero_grad_units is not None  # dead units still measurable
    assert stats.activations_observed is False


def test_model_without_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no parameters"):
        gradwatch.watch(nn.ReLU())


def test_fully_frozen_model_is_a_clear_error():
    model = mlp(2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        gradwatch.watch(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"select": ["GW999"]}, "matches no rule"),
        ({"thresholds": {"nope": {"x": 1}}}, "unknown rules"),
        ({"thresholds": {"GW101": {"nope": 1}}}, "no threshold"),
        ({"layers": ["missing.*"]}, "leave no module"),
        ({"reporters": [object()]}, "report"),
        ({"deferred": "sometimes"}, "deferred"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    model = mlp(3)
    with pytest.raises(ValueError, match=match):
        gradwatch.watch(model, **kwargs)
    # a failed watch() leaves the model free to be watched
    gradwatch.watch(model, reporters=[]).close()


def test_not_a_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"nn\.Module"):
        gradwatch.watch([nn.Linear(2, 2)])


def test_step_without_backward_is_a_no_op():
    model = mlp(3)
    with _watch(model) as watcher:
        assert watcher.step() == []
        assert watcher.latest is None
        train(model, watcher, steps=1)
        assert watcher.latest is not None and watcher.latest.step == 0
        first = watcher.latest
        assert watcher.step() == []  # no new backward since: nothing new to read
        assert watcher.latest is first


def test_watching_a_model_again_replaces_the_first_watcher():
    """A notebook cell ``watcher = gradwatch.watch(model)`` run twice: the second call
    closes the first watcher (its hooks go) and says so in one line."""
    model = mlp(3)
    first = _watch(model, every_n_steps=1)
    with pytest.warns(GradwatchWarning, match="already watched; that watcher is closed") as seen:
        second = _watch(model, every_n_steps=1)
    assert len(seen) == 1 and seen[0].filename == __file__  # points at the user's line
    assert first.closed and not second.closed
    train(model, second, steps=2)
    assert second.latest is not None and first.latest is None  # only the new one measures
    second.close()


def test_watching_part_of_a_watched_model_is_a_clear_error():
    model = mlp(3)
    first = _watch(model)
    with pytest.raises(ValueError, match="already watched"):
        gradwatch.watch(model[0])  # a part of it: closing the whole would surprise
    assert not first.closed
    first.close()
    gradwatch.watch(model[0], reporters=[]).close()  # free again after close()


def test_close_twice_is_a_no_op():
    model = mlp(3)
    watcher = _watch(model)
    train(model, watcher, steps=2)
    watcher.close()
    watcher.close()
    assert watcher.closed
    assert watcher.step() == []


def test_nan_and_inf_gradients_are_counted_not_raised():
    model = mlp(3)
    x, y = digits()
    with _watch(model) as watcher:
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        model[2].weight.grad[0, :3] = float("nan")
        model[2].weight.grad[1, 0] = float("inf")
        watcher.step()
        stats = watcher.latest
    assert stats.layers["2"].grad_nonfinite == 4
    assert math.isnan(stats.layers["2"].grad_norm)
    assert stats.layers["0"].grad_nonfinite == 0


class _Exploding(Reporter):
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def report(self, stats, findings):
        self.calls += 1
        raise RuntimeError("reporter bug")


def test_a_failing_reporter_is_disabled_once_and_training_goes_on(caplog):
    model = mlp(3)
    bad = _Exploding()
    with pytest.warns(GradwatchWarning, match="reporter exploding failed"):
        watcher = gradwatch.watch(model, every_n_steps=1, reporters=[bad])
        losses = train(model, watcher, steps=6)
    watcher.close()
    assert bad.calls == 1
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert "reporter exploding" in watcher.disabled
    assert watcher.latest.step == 5  # statistics kept running


def test_a_failing_rule_is_disabled_and_the_others_still_run():
    class Broken(gradwatch.Rule):
        code, slug, summary = "X001", "broken", "always raises"

        def check(self, ctx):
            raise ZeroDivisionError("rule bug")

    model = mlp(12, nn.Tanh, std=0.05)
    rules = [Broken(), *gradwatch.builtin_rules()]
    with pytest.warns(GradwatchWarning, match="rule X001 broken failed"):
        watcher = gradwatch.watch(model, every_n_steps=5, reporters=[], rules=rules)
        train(model, watcher, steps=40)
    watcher.close()
    assert "GW101" in {f.code for f in watcher.findings}


def test_a_failing_statistic_never_reaches_the_training_loop(monkeypatch):
    model = mlp(3)
    watcher = _watch(model)

    def boom(*args, **kwargs):
        raise RuntimeError("statistics bug")

    monkeypatch.setattr(watcher._collector, "measure", boom)
    with pytest.warns(GradwatchWarning, match="statistics failed"):
        losses = train(model, watcher, steps=4)
    watcher.close()
    assert len(losses) == 4
    assert "statistics" in watcher.disabled
    assert hooks_of(model) == hooks_of(mlp(3))


def test_a_failing_probe_switches_probes_off_but_keeps_gradients(monkeypatch):
    model = mlp(3)
    watcher = _watch(model)
    monkeypatch.setattr(
        "gradwatch.probes.unit_axis", lambda *a: (_ for _ in ()).throw(RuntimeError("probe bug"))
    )
    with pytest.warns(GradwatchWarning, match="activation probes failed"):
        train(model, watcher, steps=3)
    stats = watcher.latest
    watcher.close()
    assert stats.layers["0"].grad_norm > 0
    assert not watcher._probes.armed


def test_deferred_transfer_reports_one_monitored_step_later():
    model = mlp(3)
    watcher = _watch(model, deferred=True)
    train(model, watcher, steps=3)
    assert watcher.latest.step == 1  # step 2 still in flight
    watcher.close()
    assert watcher.latest.step == 2  # close() reads it


def test_statistics_in_flight_do_not_keep_old_gradients_alive():
    import gc
    import weakref

    model = mlp(3)
    x, y = digits()
    watcher = _watch(model, deferred=True)
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    watcher.step()  # its statistics are still in flight
    grad = weakref.ref(model[0].weight.grad)
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert grad() is None
    watcher.close()
    assert watcher.latest.step == 0
