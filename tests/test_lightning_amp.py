"""fp16 with a GradScaler under Lightning: the scaler's calibration is not a NaN error, so
``stop_on="error"`` lets a healthy run finish, while a model that really produces NaN is
still stopped."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from gradwatch.integrations.lightning import GradWatchCallback

from .dist_scripts.lit_models import Classifier, digits_loader, quiet_trainer
from .support import mlp


class Poisoned(Classifier):
    """Its logits are multiplied by log(0) = -inf: Inf/NaN at every loss scale."""

    def forward(self, x):
        return self.net(x) * torch.log(torch.zeros((), device=x.device))


def _fp16(init_scale: float) -> MixedPrecision:
    # Lightning's "16-mixed" on a CPU falls back to bf16; an explicit plugin with a scaler
    # runs the real fp16 recipe (autocast to float16 + GradScaler).
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_fp16_scaler_calibration_does_not_stop_training():
    torch.manual_seed(0)
    plugin = _fp16(2.0**24)  # overflows, skips and halves for its first several steps
    callback = GradWatchCallback(every_n_steps=5, stop_on="error", reporters=[])
    trainer = quiet_trainer(max_steps=40, callbacks=[callback], plugins=[plugin])
    trainer.fit(Classifier(mlp(6, nn.ReLU, init="kaiming"), lr=0.02), digits_loader())
    assert trainer.global_step == 40 and callback.stop_reason is None
    assert plugin.scaler.get_scale() < 2.0**24  # it did skip steps
    assert [f for f in callback.findings if f.severity in ("warning", "error")] == []
    latest = callback.watcher.latest
    assert latest.loss_scale == pytest.approx(plugin.scaler.get_scale())
    assert latest.global_grad_norm < 100  # unscaled (scaled, it would be ~1e4 times larger)


def test_fp16_model_that_produces_nan_is_still_stopped():
    torch.manual_seed(0)
    callback = GradWatchCallback(every_n_steps=5, stop_on="error", reporters=[])
    trainer = quiet_trainer(max_steps=40, callbacks=[callback], plugins=[_fp16(2.0**16)])
    trainer.fit(Poisoned(mlp(4, nn.ReLU, init="kaiming")), digits_loader())
    assert callback.stop_reason is not None and "GW103" in callback.stop_reason
    assert trainer.global_step < 40
