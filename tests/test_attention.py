"""Attention: a collapsed softmax (GW202), attention-logit growth (GW203) and fully masked
rows (GW103), on small real training runs, with attention written as an nn.Softmax
module, a functional softmax, F.scaled_dot_product_attention, nn.MultiheadAttention and
Hugging Face GPT-2 ("sdpa" and "eager")."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import gradwatch
from gradwatch.cli import main
from gradwatch.stats import StepStats

from . import zoo

VARIANTS = ["module", "functional", "sdpa"]
HEAD_DIM = 16  # zoo.CausalLM: dim 64, 4 heads
WRONG_SCALE = math.sqrt(HEAD_DIM)  # q.k * sqrt(d) instead of / sqrt(d)


def _alarms(watcher):
    return [f for f in watcher.findings if f.severity in ("warning", "error")]


def _first(watcher, code):
    found = [f for f in watcher.findings if f.code == code and f.status == "new"]
    assert found, f"no {code}; got {[(f.code, f.step, f.message) for f in watcher.findings]}"
    return found[0]


def _run_lm(model, steps=45, tokens=None, **kwargs):
    watcher = gradwatch.watch(model, reporters=[])
    tokens = zoo.copy_task() if tokens is None else tokens
    losses = zoo.train_lm(model, watcher, tokens, steps=steps, **kwargs)
    watcher.close()
    return watcher, losses


# -- a wrong scale saturates the softmax ----------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrong_attention_scale_gets_saturated_activation_within_45_steps(variant):
    watcher, _ = _run_lm(zoo.CausalLM(variant=variant, scale=WRONG_SCALE))
    finding = _first(watcher, "GW202")
    assert finding.step < 45  # default settings: monitored at 0, 15, 30
    assert finding.layers[0] == "blocks.0.attn" and "blocks.1.attn" in finding.layers
    if variant == "module":
        assert "blocks.0.attn.softmax" in finding.layers  # the module and its softmax
    evidence = finding.evidence
    assert evidence["scale_ratio"] == pytest.approx(16.0)  # 4 / (1/sqrt(16))
    assert evidence["entropy"] < 0.35 and evidence["first_step"] == 0
    assert evidence["max_logit"] > 10 and 0 < evidence["saturated_fraction"] < 1
    assert finding.hint.startswith("Fix the attention scale")
    assert "1/sqrt(16) = 0.25" in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW202"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_usual_scale_is_silent_and_measured(variant):
    watcher, losses = _run_lm(zoo.CausalLM(variant=variant), steps=60)
    assert _alarms(watcher) == []
    attention = watcher.latest.attention
    assert set(attention) == {"blocks.0.attn", "blocks.1.attn"}
    for stats in attention.values():
        assert stats.entropy > 0.9  # close to uniform at the start
        assert stats.scale_ratio == pytest.approx(1.0)
        assert stats.judged_rows > 0 and stats.keys == 31
    assert losses[-1] < losses[0]


def test_the_three_ways_of_writing_attention_measure_the_same_numbers():
    numbers = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = zoo.CausalLM(variant=variant, scale=WRONG_SCALE)
        watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
        zoo.train_lm(model, watcher, zoo.copy_task(), steps=2)
        stats = watcher.latest.attention["blocks.1.attn"]
        numbers[variant] = (stats.entropy, stats.saturated_fraction, stats.max_logit)
        assert stats.via == {
            "module": "nn.Softmax",
            "functional": "softmax",
            "sdpa": "scaled_dot_product_attention",
        }[variant]
        watcher.close()
    # SDPA's logits are recomputed from q and k with its scale and causal mask
    for variant in ("functional", "sdpa"):
        assert numbers[variant] == pytest.approx(numbers["module"], rel=1e-4)


def test_deep_pre_ln_model_is_silent():
    watcher, _ = _run_lm(zoo.CausalLM(blocks=12, variant="sdpa"), steps=46)
    assert _alarms(watcher) == []
    assert len(watcher.latest.attention) == 12


@pytest.mark.parametrize("variant", ["functional", "sdpa"])
def test_bf16_autocast_is_silent_and_measured(variant):
    model = zoo.CausalLM(variant=variant)
    watcher, _ = _run_lm(model, steps=46, batch=8, autocast=torch.bfloat16)
    assert _alarms(watcher) == []
    assert all(a.entropy > 0.9 for a in watcher.latest.attention.values())


def test_bf16_autocast_with_wrong_scale_is_still_found():
    model = zoo.CausalLM(variant="functional", scale=WRONG_SCALE)  # bf16 scores, fp32 softmax
    watcher, _ = _run_lm(model, batch=8, autocast=torch.bfloat16)
    assert _first(watcher, "GW202").layers[0] == "blocks.0.attn"


def test_multihead_attention_encoder_is_silent_and_measured():
    x, y = zoo.token_task()
    model = zoo.TinyTransformer()  # nn.TransformerEncoder: need_weights=False, SDPA
    watcher = gradwatch.watch(model, reporters=[])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(60):
        idx = slice(32 * step % 1024, 32 * step % 1024 + 32)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
    watcher.close()
    assert _alarms(watcher) == []
    attention = watcher.latest.attention
    assert set(attention) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    assert all(a.via == "scaled_dot_product_attention" for a in attention.values())
    assert all(a.scale_ratio == pytest.approx(1.0) for a in attention.values())


class _MHA(nn.Module):
    """nn.MultiheadAttention called directly, with need_weights=True (its softmax path)."""

    def __init__(self, padded=None):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens, key_padding_mask=None):
        h = self.embed(tokens)
        out, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=True)
        return self.head(out.mean(1))


def test_multihead_attention_softmax_path_is_measured():
    x, y = zoo.token_task()
    model = _MHA()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    watcher.step()
    stats = watcher.latest.attention["attn"]
    assert stats.via == "softmax" and stats.scale_ratio == pytest.approx(1.0)
    assert stats.entropy > 0.9 and stats.keys == 16
    watcher.close()


# -- fully masked rows: NaN ------------------------------------------------------------


@pytest.mark.parametrize("variant", ["module", "functional"])
def test_left_padding_with_causal_mask_gets_nonfinite_naming_the_softmax(variant):
    tokens = zoo.copy_task(n=64)
    padding = torch.zeros(64, 32, dtype=torch.bool)
    padding[::4, :5] = True  # every 4th sequence is left-padded with 5 tokens
    model = zoo.CausalLM(variant=variant)
    watcher, _ = _run_lm(model, steps=2, tokens=tokens, key_padding=padding)
    finding = _first(watcher, "GW103")
    assert finding.step == 0
    assert finding.layers[0] == "blocks.0.attn"
    if variant == "module":
        assert finding.layers[1] == "blocks.0.attn.softmax"
    assert "every key masked" in finding.message and "blocks.0.attn" in finding.message
    assert "Left padding" in finding.hint and "finfo(dtype).min" in finding.hint
    evidence = finding.evidence
    # the padded sequences of the batch x 4 heads x the 5 query rows that see only padding
    padded = evidence["fully_masked_rows"] // (4 * 5)
    assert evidence["fully_masked_rows"] == padded * 4 * 5 and padded >= 1
    assert evidence["nonfinite_attention_rows"] == evidence["fully_masked_rows"]


def test_nan_from_upstream_is_not_blamed_on_masking():
    class NaNEmbedding(zoo.CausalLM):
        def forward(self, tokens, key_padding=None):
            positions = torch.arange(tokens.shape[1])
            h = self.embed(tokens) + self.pos(positions)
            h = self.ln(h) * float("nan")
            for block in self.blocks:
                h = block(h)
            return self.head(h)

    watcher, _ = _run_lm(NaNEmbedding(), steps=1)
    finding = _first(watcher, "GW103")
    assert "masked" not in finding.hint and "attention" not in finding.message
    assert finding.layers[0] == "blocks.0.ln1"  # the first module whose output is NaN


# -- learned sharpness is not a fault; growing logits are -------------------------------


def test_attention_that_training_sharpens_is_not_a_fault():
    # The copy task needs a head that looks at one earlier token: it learns one.
    model = zoo.CausalLM(variant="functional")
    watcher, losses = _run_lm(model, steps=166, tokens=zoo.copy_task(n=2048), lr=3e-3, batch=32)
    sharp = [s.attention["blocks.0.attn"].entropy for s in watcher.history.last(4)]
    assert max(sharp) < 0.35  # as collapsed as a wrong scale makes it, but learned
    assert watcher.history.last(1)[0].attention["blocks.0.attn"].max_logit < 50
    assert sum(losses[-10:]) / 10 < 2.5 < losses[0]
    assert _alarms(watcher) == []


def test_attention_logits_growing_under_a_high_learning_rate_get_gw203_first():
    tokens = zoo.copy_task(n=2048)
    model = zoo.CausalLM(variant="sdpa")
    watcher = gradwatch.watch(model, reporters=[])
    zoo.train_lm(model, watcher, tokens, steps=150, lr=1e-2, batch=32)
    watcher.close()
    growth = _first(watcher, "GW203")
    assert growth.step <= 135
    assert growth.evidence["max_logit"] >= 30
    assert growth.evidence["growth"] >= 2
    assert "warm up" in growth.hint and "QK normalisation" in growth.hint
    saturation = [f for f in watcher.findings if f.code == "GW202"]
    assert all(f.step > growth.step for f in saturation)  # growth is reported first


# -- how the capture behaves ---------------------------------------------------------


class _ProbeDepth(nn.Module):
    """Records how many torch function modes are active while it runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(len(_get_current_function_mode_stack()))
        return x


class _RecordingAttention(zoo.CausalSelfAttention):
    def __init__(self):
        super().__init__(64, 4)
        self.probe = _ProbeDepth()

    def forward(self, x, key_padding=None):
        self.probe(x)
        return super().forward(x, key_padding)


class _Recording(zoo.CausalLM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.probe = _ProbeDepth()
        self.blocks[0].attn = _RecordingAttention()

    def forward(self, tokens, key_padding=None):
        return super().forward(self.probe(tokens), key_padding)


def test_mode_is_active_only_during_monitored_forward_passes():
    model = _Recording()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=2)
    zoo.train_lm(model, watcher, zoo.copy_task(), steps=9)
    # Monitored steps 0, 2, 4, 6, 8. The first three (detail steps) hold the mode over the
    # whole forward pass and find the attention modules; later ones only while those run.
    assert model.probe.seen == [1, 0, 1, 0, 1, 0, 0, 0, 0]
    assert model.blocks[0].attn.probe.seen == [1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert set(watcher.latest.attention) == {"blocks.0.attn", "blocks.1.attn"}
    assert _get_current_function_mode_stack() == []
    with torch.no_grad():  # validation: not measured, no mode
        model(zoo.copy_task()[:4, :-1])
    assert model.probe.seen[-1] == 0 and model.blocks[0].attn.probe.seen[-1] == 0
    watcher.close()


def test_an_exception_in_the_forward_pass_leaves_no_mode_behind():
    class Failing(zoo.CausalLM):
        def forward(self, tokens, key_padding=None):
            super().forward(tokens)
            raise RuntimeError("user error")

    model = Failing()
    watcher = gradwatch.watch(model, reporters=[])
    with pytest.raises(RuntimeError, match="user error"):
        model(zoo.copy_task()[:2, :-1])
    assert _get_current_function_mode_stack() == []
    watcher.close()


def test_a_softmax_that_is_not_attention_is_not_judged():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 5)

        def forward(self, x):
            return torch.softmax(self.body(x).unsqueeze(1) * 40, -1)  # confident, 3-D

    model = Classifier()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    model(torch.randn(16, 8)).log().mean().backward()
    watcher.step()
    assert watcher.latest.attention == {}
    watcher.close()


def test_checkpointed_blocks_are_measured_once_per_step():
    class Checkpointed(zoo.CausalLM):
        def forward(self, tokens, key_padding=None):
            h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=False)
            return self.head(self.ln(h))

    model = Checkpointed(variant="functional")
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    zoo.train_lm(model, watcher, zoo.copy_task(), steps=2)
    assert {a.calls for a in watcher.latest.attention.values()} == {1}
    watcher.close()


def test_sdpa_with_grouped_query_heads_and_a_boolean_mask_matches_the_explicit_softmax():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8) * 3
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    allowed[1, :, :, :2] = False  # the second sequence is left-padded by 2
    allowed[1, :, :2, :2] = True  # ... and its padded queries see the padding

    class Explicit(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.fused = fused
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, q, k, v):
            if self.fused:
                return F.scaled_dot_product_attention(
                    q * self.w, k, v, attn_mask=allowed, enable_gqa=True
                )
            k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
            scores = (q * self.w) @ k2.transpose(-2, -1) / math.sqrt(8)
            return torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v2

    numbers = []
    for fused in (True, False):
        model = Explicit(fused)
        watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
        model(q, k, v).sum().backward()
        watcher.step()
        stats = watcher.latest.attention[""]
        numbers.append((stats.entropy, stats.saturated_fraction, stats.max_logit))
        # rows that see one key do not count: query 0 of the first sequence, 2 of the second
        assert stats.judged_rows == 2 * 4 * 6 - 4 - 4
        watcher.close()
    assert numbers[0] == pytest.approx(numbers[1], rel=1e-4)


def test_statistics_round_trip_through_the_jsonl_record(tmp_path):
    model = zoo.CausalLM(variant="sdpa")
    path = tmp_path / "run.jsonl"
    watcher = gradwatch.watch(
        model, reporters=[gradwatch.JsonlRecorder(path)], every_n_steps=1
    )
    zoo.train_lm(model, watcher, zoo.copy_task(), steps=1)
    watcher.close()
    before = watcher.latest.attention
    after = StepStats.from_dict(watcher.latest.to_dict()).attention
    assert after == before and after["blocks.0.attn"].entropy > 0.9


def test_saturation_memory_survives_a_checkpoint():
    watcher, _ = _run_lm(zoo.CausalLM(variant="functional", scale=WRONG_SCALE))
    state = watcher.state_dict()
    fresh = gradwatch.watch(zoo.CausalLM(), reporters=[])
    fresh.load_state_dict(state)
    rule = next(r for r in fresh.rules if r.code == "GW202")
    assert rule.state_dict()["attention"]["first"]["blocks.0.attn"][0] == 0
    fresh.close()


def test_rules_and_explain_cover_attention(capsys):
    assert main(["rules"]) == 0
    assert "GW203" in capsys.readouterr().out
    assert main(["explain", "attention-logit-growth"]) == 0
    out = capsys.readouterr().out
    assert "QK" in out and "min_logit = 30" in out
    assert main(["explain", "GW202"]) == 0
    out = capsys.readouterr().out
    assert "attention_entropy = 0.35" in out and "scaled_dot_product_attention" in out


# -- Hugging Face Transformers GPT-2, built from a config ------------------------------


def _gpt2(implementation, wrong_scale=False):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.05,
        attn_implementation=implementation,
    )
    model = transformers.GPT2LMHeadModel(config)
    if wrong_scale:
        for block in model.transformer.h:
            block.attn.scaling = math.sqrt(block.attn.head_dim)
    return model


def _train_gpt2(model, steps):
    watcher = gradwatch.watch(model, reporters=[])
    tokens = zoo.copy_task()
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = tokens[torch.randint(0, len(tokens), (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt, loss=loss)
        opt.step()
    watcher.close()
    return watcher


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_gpt2_wrong_scale_gets_saturated_activation(implementation):
    watcher = _train_gpt2(_gpt2(implementation, wrong_scale=True), steps=45)
    finding = _first(watcher, "GW202")
    assert finding.step < 45
    assert set(finding.layers) >= {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert finding.evidence["scale_ratio"] == pytest.approx(64.0)
    assert finding.hint.startswith("Fix the attention scale")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_gpt2_usual_scale_is_silent_and_measured(implementation):
    watcher = _train_gpt2(_gpt2(implementation), steps=60)
    assert _alarms(watcher) == []
    attention = watcher.latest.attention
    assert set(attention) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert all(a.entropy > 0.9 and a.scale_ratio == pytest.approx(1.0) for a in attention.values())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_trainer_callback_finds_the_wrong_scale_and_measures_the_usual_one(
    implementation, tmp_path
):
    """The same capture runs under transformers.Trainer with gradwatch's callback."""
    pytest.importorskip("accelerate")
    from transformers import Trainer

    from gradwatch.integrations.transformers import GradWatchCallback

    from .dist_scripts.hf_models import trainer_args

    tokens = zoo.copy_task()
    data = [{"input_ids": row, "labels": row} for row in tokens[:512]]
    for wrong_scale in (True, False):
        watch = GradWatchCallback()
        trainer = Trainer(
            model=_gpt2(implementation, wrong_scale=wrong_scale),
            args=trainer_args(tmp_path / str(wrong_scale), max_steps=45),
            train_dataset=data,
            callbacks=[watch],
        )
        trainer.train()
        codes = [f.code for f in watch.findings if f.severity in ("warning", "error")]
        attention = watch.watcher.latest.attention
        assert set(attention) == {"transformer.h.0.attn", "transformer.h.1.attn"}
        if wrong_scale:
            assert codes and set(codes) == {"GW202"}, codes
            assert watch.findings[0].evidence["scale_ratio"] == pytest.approx(64.0)
        else:
            assert codes == []
            assert all(a.entropy > 0.9 for a in attention.values())
