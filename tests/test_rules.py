"""Each built-in rule on a real small training run: sick models get their finding with the
right layers; healthy models get no warning or error. Default settings throughout
(every_n_steps=10), so a finding must arrive within 50 steps."""

import math

import pytest
import torch
from torch import nn

import gradwatch

from . import zoo
from .support import accuracy, digits, mlp, train, train_with_zeroed_aux_grads


def _run(model, steps=60, **train_kwargs):
    watcher = gradwatch.watch(model, reporters=[])
    losses = train(model, watcher, steps=steps, **train_kwargs)
    watcher.close()
    return watcher, losses


def _alarms(watcher):
    return [f for f in watcher.findings if f.severity in ("warning", "error")]


def _first(watcher, code):
    found = [f for f in watcher.findings if f.code == code and f.status == "new"]
    assert found, f"no {code} finding; got {[(f.code, f.step) for f in watcher.findings]}"
    return found[0]


# -- sick models ----------------------------------------------------------------------


def test_deep_sigmoid_mlp_gets_vanishing_gradient_with_the_early_layers():
    watcher, _ = _run(mlp(30, nn.Sigmoid), lr=0.1)
    finding = _first(watcher, "GW101")
    assert finding.step <= 50
    assert finding.layers[0] == "0"  # the first Linear, in forward order
    assert finding.evidence["ratio"] < 1e-6
    assert finding.severity == "error"  # its gradient is exactly 0: nothing can move
    assert "sigmoid" in finding.hint.lower() and "relu" in finding.hint.lower()


def test_deep_tanh_mlp_with_small_init_gets_vanishing_gradient():
    watcher, _ = _run(mlp(12, nn.Tanh, std=0.05), lr=0.1)
    finding = _first(watcher, "GW101")
    assert finding.step <= 50
    assert finding.layers[:2] == ("0", "2")
    assert finding.evidence["ratio"] < 1e-2
    assert "xavier" in finding.hint and "calculate_gain('tanh')" in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW101"]


def test_deep_relu_with_default_init_is_told_to_use_kaiming():
    watcher, _ = _run(mlp(30, nn.ReLU), lr=0.1)
    finding = _first(watcher, "GW101")
    assert finding.evidence["ratio"] < 1e-6
    assert "kaiming" in finding.hint
    assert finding.evidence["init_gain"] == pytest.approx(0.58, abs=0.05)


def test_relu_layer_biased_to_minus_4_gets_dead_units_on_that_layer():
    model = zoo.relu_with_dead_layer(depth=5, dead_layer=2)  # Linear "4", ReLU "5"
    watcher, _ = _run(model, lr=0.05)
    finding = _first(watcher, "GW201")
    assert finding.step <= 50
    assert finding.layers[:2] == ("4", "5")
    assert finding.severity == "error"  # every unit of it is dead
    assert "first monitored steps" in finding.hint  # dead from the start, not by the LR
    assert not [f for f in watcher.findings if f.code == "GW101"]  # the cause is named once


def test_dead_layer_behind_functional_relu_is_found_without_activation_modules():
    model = zoo.FunctionalReLU(depth=5, dead_layer=2)
    watcher, _ = _run(model, lr=0.05)
    finding = _first(watcher, "GW201")
    assert finding.layers[0] == "layers.2"
    assert finding.evidence["worst_layer"] == "layers.2"


def test_relu_mlp_killed_by_a_large_learning_rate_gets_dead_units():
    model = mlp(5, nn.ReLU, init="kaiming")
    watcher, losses = _run(model, steps=100, lr=0.1, optimizer="adam")
    finding = _first(watcher, "GW201")
    assert finding.step <= 50
    assert all(math.isfinite(v) for v in losses)  # dead, not NaN
    assert finding.evidence["dead_fraction"] > 0.5
    assert "died during training" in finding.hint and "lr=0.1" in finding.hint


def test_leaky_relu_under_the_same_large_learning_rate_has_no_dead_units():
    model = mlp(5, nn.LeakyReLU, init="kaiming")
    watcher, _ = _run(model, steps=100, lr=0.5)
    assert not [f for f in watcher.findings if f.code == "GW201"]


def test_exploding_init_gets_exploding_gradient_before_the_nan():
    model = mlp(8, nn.ReLU, std=1.0)
    watcher, _ = _run(model, steps=30, lr=0.01)
    finding = _first(watcher, "GW102")
    assert finding.step == 0
    assert finding.severity == "error"
    assert finding.evidence["max_update_ratio"] > 10
    assert "0" in finding.layers
    assert "clip" in finding.hint.lower()


def test_nan_injected_mid_run_is_an_immediate_error():
    model = mlp(4, nn.ReLU, init="kaiming")

    def inject(step):
        if step == 45:  # the forward pass of a monitored step
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")

    watcher, _ = _run(model, steps=60, lr=0.05, before_step=inject)
    finding = _first(watcher, "GW103")
    assert finding.step == 45
    assert finding.severity == "error"
    assert finding.layers[0] == "2"  # where it first appears: the poisoned weights
    assert finding.evidence["first_nonfinite_weights"] == "2"
    assert finding.evidence["nonfinite_values"] > 0


def test_nan_in_the_data_names_the_first_layer():
    model = mlp(4, nn.ReLU, init="kaiming")
    x, y = digits()
    x[5, 3] = float("nan")  # one poisoned sample
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    watcher.step()
    watcher.close()
    finding = _first(watcher, "GW103")
    assert finding.step == 0 and finding.layers[0] == "0"


def test_detached_sub_network_gets_no_gradient():
    watcher, _ = _run(zoo.Detached(), lr=0.05)
    finding = _first(watcher, "GW104")
    assert finding.step <= 50
    assert set(finding.layers) == {"aux.0", "aux.2"}
    assert "detach" in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW104"]


def test_detached_sub_network_with_zeroed_grads_is_also_found():
    model = zoo.Detached()
    watcher = gradwatch.watch(model, reporters=[])
    train_with_zeroed_aux_grads(model, watcher, steps=40)
    watcher.close()
    assert set(_first(watcher, "GW104").layers) >= {"aux.0", "aux.2"}


def test_raw_pixel_inputs_saturate_a_sigmoid_mlp():
    x, y = digits(standardize=False)
    watcher, _ = _run(mlp(3, nn.Sigmoid), lr=0.05, x=x * 16, y=y)  # 0-255 pixels
    finding = _first(watcher, "GW202")
    assert finding.step <= 50
    assert finding.layers[:2] == ("0", "1")
    assert finding.evidence["saturated_fraction"] > 0.5
    assert "normalis" in finding.hint and "255" in finding.hint


# -- healthy models ---------------------------------------------------------------------


def test_he_init_relu_mlp_is_silent():
    model = mlp(8, nn.ReLU, init="kaiming")
    watcher, losses = _run(model, steps=200, lr=0.05)
    assert losses[-1] < 0.5 * losses[0]
    assert _alarms(watcher) == []


def test_deep_he_init_relu_mlp_is_silent():
    watcher, _ = _run(mlp(30, nn.ReLU, init="kaiming"), steps=100, lr=0.01)
    assert _alarms(watcher) == []


def test_residual_sigmoid_mlp_is_silent():
    model = zoo.ResidualMLP(depth=30)
    watcher, losses = _run(model, steps=200, lr=0.1)
    assert losses[-1] < 0.5 * losses[0]
    assert _alarms(watcher) == []


def test_batchnorm_resnet_cnn_is_silent():
    model = zoo.SmallResNet()
    watcher, losses = _run(model, steps=100, lr=0.05)
    assert losses[-1] < losses[0]
    assert _alarms(watcher) == []


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-3), ("sgd", 0.05)])
def test_small_transformer_with_embedding_is_silent(optimizer, lr):
    tokens, labels = zoo.token_task()
    model = zoo.TinyTransformer()
    watcher, losses = _run(model, steps=150, lr=lr, optimizer=optimizer, x=tokens, y=labels)
    assert losses[-1] < losses[0]
    # tokens 40-49 never occur: their embedding rows get no gradient, which is not death
    detailed = [s for s in watcher.history if s.detail][-1]
    assert detailed.layers["embed"].grad_zero_fraction > 0.19
    assert _alarms(watcher) == []


def test_frozen_backbone_is_silent():
    watcher, _ = _run(zoo.FrozenBackbone(), steps=100, lr=0.05)
    assert _alarms(watcher) == []


def test_converged_logistic_regression_is_silent():
    model = nn.Linear(64, 10)
    x, y = digits()
    watcher, _ = _run(model, steps=400, lr=0.5, x=x, y=y)
    assert accuracy(model, x, y) > 0.95
    assert watcher.latest.global_grad_norm < 0.5
    assert _alarms(watcher) == []


@pytest.mark.parametrize("depth, init", [(4, None), (6, "kaiming")])
def test_gelu_mlp_is_silent(depth, init):
    watcher, losses = _run(mlp(depth, nn.GELU, init=init), steps=200, lr=0.1)
    assert losses[-1] < 0.5 * losses[0]
    assert _alarms(watcher) == []


def test_leaky_relu_mlp_is_silent():
    watcher, _ = _run(mlp(8, nn.LeakyReLU, init="kaiming"), steps=200, lr=0.05)
    assert _alarms(watcher) == []


def test_adam_compensates_small_but_usable_gradients():
    # A 10-layer sigmoid net has early gradients ~1e-8 of the late ones, but Adam divides
    # each by its own scale: it still steps every layer (unless it sinks below eps).
    model = mlp(10, nn.Sigmoid)
    watcher, _ = _run(model, steps=60, lr=1e-3, optimizer="adam")
    assert not [f for f in watcher.findings if f.code == "GW101"]
    plain, _ = _run(mlp(10, nn.Sigmoid), steps=60, lr=0.5)
    assert _first(plain, "GW101").severity == "error"


def test_a_confident_sigmoid_output_layer_is_not_saturation():
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.mul_(300.0)  # outputs pinned near 0 and 1 from the start

    def bce(out, labels):
        targets = (labels[:, None] == torch.arange(10)).float()
        return nn.functional.binary_cross_entropy(out, targets)

    watcher, _ = _run(model, steps=60, lr=0.05, x=x, y=y, loss_fn=bce)
    assert all(s.layers["3"].saturated_fraction > 0.5 for s in watcher.history)
    assert not [f for f in watcher.findings if f.code == "GW202"]
