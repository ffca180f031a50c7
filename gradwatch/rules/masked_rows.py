"""Where GW103 non-finite-gradient meets attention: a softmax whose rows are NaN.

A row of attention logits whose every key is masked with -inf has no largest value to
normalise by: softmax computes 0/0 and returns NaN, which the backward pass spreads to
every gradient. Left padding under a causal mask does it (the first query positions
of a left-padded sequence see only padding), and so does a key-padding mask that
covers every key a query may see.
"""

from __future__ import annotations

from typing import Any

from ..stats import AttentionStats, StepStats


def _contains(outer: str, inner: str) -> bool:
    return outer == inner or outer == "" or inner.startswith(outer + ".")


def attention_origin(stats: StepStats, origin: str) -> AttentionStats | None:
    """The attention module whose probabilities are the first NaN/Inf of the forward pass,
    given ``origin``, the first watched module whose output is NaN/Inf: the attention
    module is that module, inside it or around it, or ran before it."""
    candidates = [a for a in stats.attention.values() if a.nonfinite_rows]
    if not candidates:
        return None
    origin_stats = stats.layers.get(origin)
    origin_depth = origin_stats.depth if origin_stats is not None else None
    candidates.sort(key=lambda a: (a.depth is None, a.depth or 0.0))
    for a in candidates:
        related = _contains(origin, a.name) or _contains(a.name, origin)
        before = a.depth is not None and origin_depth is not None and a.depth <= origin_depth
        if related or before:
            return a
    return None


def describe(a: AttentionStats) -> tuple[str, str, dict[str, Any]]:
    """(message part, hint, evidence) for GW103 when ``a`` is where NaN first appears."""
    what = f"the attention softmax of {a.label}"
    evidence: dict[str, Any] = {
        "attention_module": a.name,
        "computed_by": a.softmax or a.via,
        "nonfinite_attention_rows": a.nonfinite_rows,
    }
    if a.fully_masked_rows is not None:
        evidence["fully_masked_rows"] = a.fully_masked_rows
    if a.nonfinite_logit_rows:
        evidence["nonfinite_logit_rows"] = a.nonfinite_logit_rows
        return (
            f"{what}: {a.nonfinite_logit_rows} rows of its logits are already NaN/+Inf",
            f"The logits going into {what} are NaN/+Inf: q.k overflowed (fp16: compute "
            "attention in float32 or bf16, divide by sqrt(head size) before the product) or "
            "a NaN reached q or k from an earlier operation.",
            evidence,
        )
    if a.fully_masked_rows:
        return (
            f"{what}: {a.fully_masked_rows} rows have every key masked",
            f"{what[0].upper()}{what[1:]} returns NaN for rows whose every key is masked: "
            "with -inf everywhere, softmax divides 0 by 0. Left padding under a causal mask "
            "does this (the first positions of a left-padded sequence see only padding), as "
            "does a key-padding mask covering all the keys a query may see. Fill masks with "
            "torch.finfo(dtype).min instead of -inf, let every query see at least one key "
            "(its own position), pad on the right, or use F.scaled_dot_product_attention "
            "(fully masked rows give 0); keep padded positions out of the loss.",
            evidence,
        )
    return (
        f"{what}: {a.nonfinite_rows} rows of its probabilities are NaN/Inf",
        f"{what[0].upper()}{what[1:]} returns NaN/Inf: check its mask (a row whose every "
        "key is masked gives NaN) and its logits (overflow in fp16).",
        evidence,
    )
