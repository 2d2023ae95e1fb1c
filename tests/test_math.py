"""FLAP's math on hand-made tensors, with answers worked out by hand: a wrong formula fails here even when
mask and prune agree."""

from __future__ import annotations

import math

import pytest
import torch

from flap_llm import FlapError
from flap_llm.math import metrics
from flap_llm.model.arch import Dims
from flap_llm.math.compensate import bias_compensation
from flap_llm.math.select import adaptive, adaptive_manual, standardize, uniform, uniform_manual
from flap_llm.math.stats import ChannelStats

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def _stats() -> ChannelStats:
    # 3 tokens, 2 channels: channel 0 takes 1, 3, 5; channel 1 is constant 2
    s = ChannelStats(2)
    s.update(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    s.update(torch.tensor([[5.0, 2.0]]))
    return s


def test_statistics_are_the_population_moments():
    s = _stats()
    assert s.n == 3
    torch.testing.assert_close(s.mean, T(3, 2))
    torch.testing.assert_close(s.var, T(8 / 3, 0))
    torch.testing.assert_close(s.mean_sq, T(35 / 3, 4))


def test_fluctuation_metrics():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # [d_out, d_in]
    s = _stats()
    torch.testing.assert_close(metrics.fluctuation("IFV", s, w), T(8 / 3, 0))
    torch.testing.assert_close(metrics.fluctuation("WIFV", s, w), T(8 / 3 * (1 + 9), 0))
    torch.testing.assert_close(metrics.fluctuation("WIFN", s, w), T(2 * math.sqrt(35 / 3), 3 * 2))
    with pytest.raises(FlapError, match="unknown metric"):
        metrics.fluctuation("XYZ", s, w)


def test_standardize_uses_the_unbiased_std():
    z = standardize(T(1, 2, 3, 4))
    torch.testing.assert_close(z, T(-1.5, -0.5, 0.5, 1.5) / math.sqrt(5 / 3))
    assert standardize(T(7, 7, 7)).tolist() == [0, 0, 0]


# Two layers, two KV groups of one head each (head_dim 3), three MLP channels: a group weighs
# head_dim*(2g+2)/3 = 4 MLP channels, the decoder 2*(2*4 + 3) = 22.
DIMS = Dims(n_layers=2, n_heads=2, n_kv_heads=2, head_dim=3, hidden=3, d_ff=3)
ATTN = [T(0, 0, 0, 3, 3, 3), T(1, 2, 3, 1, 2, 3)]
MLP = [T(1, 2, 3), T(10, 0, 5)]


def _lists(sel):
    return [g.tolist() for g in sel.kept_groups], [c.tolist() for c in sel.kept_channels]


def test_adaptive_global_ranking():
    # z-scores: L0 groups -0.913/+0.913, L1 groups 0/0; L0 channels -1/0/1, L1 channels 1/-1/0.
    # Descending (stable): L0C2 1, L1C0 1, L0G1 .913, L1G0 0, L1G1 0, L0C1 0, L1C2 0, L0G0 -.913, ...
    # cumulative weight: 1, 2, 6, 10, 14, 15, 16, ...; budget (1-0.3)*22 = 15.4 keeps the first six.
    assert DIMS.group_weight == 4
    assert _lists(adaptive(ATTN, MLP, DIMS, 0.3)) == ([[1], [0, 1]], [[1, 2], [0]])


def test_adaptive_manual():
    # the lowest group globally (L0G0), then floor(0.3*22 - 4) = 2 lowest channels globally (L0C0, L1C1)
    assert _lists(adaptive_manual(ATTN, MLP, DIMS, 0.3, remove_heads=1)) == ([[1], [0, 1]], [[1, 2], [0, 2]])


def test_uniform_and_uniform_manual():
    # UL-UM at 0.5: floor(0.5*2) = 1 group per layer by summed raw scores (L0: 0 vs 9; L1: a tie, the first
    # goes) and floor(0.5*3) = 1 channel per layer
    assert _lists(uniform(ATTN, MLP, DIMS, 0.5)) == ([[1], [1]], [[1, 2], [0, 2]])
    # UL-MM at 0.5 with 2 groups: one per layer, then floor(0.5*22 - 2*4) = 3 channels -> 3 // 2 = 1 per layer
    assert _lists(uniform_manual(ATTN, MLP, DIMS, 0.5, remove_heads=2)) == ([[1], [1]], [[1, 2], [0, 2]])


def test_bias_compensation_adds_the_removed_columns_mean_contribution():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([0.5, -0.5])
    new = bias_compensation(w, b, T(1, 10, 100), torch.tensor([0, 2]))
    torch.testing.assert_close(new, T(0.5 + 1 + 300, -0.5 + 4 + 600))
    torch.testing.assert_close(bias_compensation(w, None, T(1, 10, 100), torch.tensor([1])), T(20, 50))
