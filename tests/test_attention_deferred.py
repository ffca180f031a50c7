"""The sampled logits of scaled_dot_product_attention calls, computed when the step is
packed (one batched product over calls) instead of at each call: the attention statistics
of real training runs are exactly those the per-call computation gives."""

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import attention, attention_sample

from . import zoo


class PaddedLM(zoo.CausalLM):
    """Keys padded by a boolean mask: a call with an explicit mask (computed at the call)."""

    def __init__(self) -> None:
        super().__init__(variant="sdpa")
        for block in self.blocks:
            block.attn.forward = self._padded(block.attn)

    @staticmethod
    def _padded(attn):
        def forward(x, key_padding=None):
            b, t, _ = x.shape
            q, k, v = attn.qkv(x).view(b, t, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            keep = torch.ones(t, t, dtype=torch.bool).tril()
            keep = keep & (torch.arange(t) < t - 3)  # the last keys are padding
            keep[:, 0] = True
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            return attn.proj(out.transpose(1, 2).reshape(b, t, -1))

        return forward


def _attention_stats(make_model, monkeypatch, defer: bool, **train) -> tuple[list, int]:
    deferred = []
    real = attention_sample.defer_sdpa_logits

    def counted(*args):
        found = real(*args) if defer else None
        deferred.append(found is not None)
        return found

    monkeypatch.setattr(attention, "defer_sdpa_logits", counted)
    torch.manual_seed(0)
    model = make_model()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    zoo.train_lm(model, watcher, zoo.copy_task(n=64), steps=5, batch=8, **train)
    watcher.close()
    stats = [{n: a.to_dict() for n, a in s.attention.items()} for s in watcher.history.last(5)]
    return stats, sum(deferred)


@pytest.mark.parametrize(
    ("make_model", "train", "deferred"),
    [
        (lambda: zoo.CausalLM(variant="sdpa"), {}, True),
        (lambda: zoo.CausalLM(variant="sdpa"), {"autocast": torch.bfloat16}, True),
        (PaddedLM, {}, False),
    ],
    ids=["causal", "bfloat16-autocast", "explicit-mask"],
)
def test_logits_computed_at_packing_equal_those_computed_at_the_call(
    make_model, train, deferred, monkeypatch
):
    at_call, _ = _attention_stats(make_model, monkeypatch, defer=False, **train)
    at_packing, used = _attention_stats(make_model, monkeypatch, defer=True, **train)
    assert (used > 0) == deferred  # the batched path ran where it applies, and only there
    assert len(at_packing) == 5 and all(step for step in at_packing)
    assert at_packing == at_call
