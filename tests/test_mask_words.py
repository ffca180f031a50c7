"""Unit masks travel as raw 64-bit words: every bit pattern comes back, NaN-shaped ones too."""

from __future__ import annotations

import torch

from gradwatch.collect import bit_words_to_bytes, pack_bit_words


def _bits(mask: torch.Tensor) -> int:
    return sum(1 << i for i, on in enumerate(mask.tolist()) if on)


def test_every_pattern_round_trips_through_the_transfer() -> None:
    signalling_nan = [True] + [False] * 51 + [True] * 11 + [False]  # 0x7FF0000000000001
    quiet_nan_all_ones = [True] * 64
    infinity = [False] * 52 + [True] * 11 + [False]
    torch.manual_seed(0)
    random = (torch.rand(1000) > 0.5).tolist()
    for pattern in (signalling_nan, quiet_nan_all_ones, infinity, random, [True] * 3):
        mask = torch.tensor(pattern)
        values = torch.cat([torch.ones(2, dtype=torch.float64), pack_bit_words(mask)]).tolist()
        got = int.from_bytes(bit_words_to_bytes(values[2:]), "little")
        assert got == _bits(mask)
