"""Least-squares compensation: the kept columns are refit so the layer output is reconstructed."""

from __future__ import annotations

import copy

import pytest
import torch

import flap_llm
from flap_llm.math.compensate import bias_compensation, lsq_compensation
from flap_llm.math.stats import Covariance
from conftest import calibration, tiny_model


def _moments(x: torch.Tensor) -> Covariance:
    cov = Covariance(x.shape[1])
    for chunk in x.split(37):  # streamed in uneven chunks, like the walk does
        cov.update(chunk)
    return cov


def _correlated(n=2000, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)


def test_covariance_matches_torch():
    x = _correlated()
    cov = _moments(x)
    torch.testing.assert_close(cov.mean, x.mean(0))
    torch.testing.assert_close(cov.cov, torch.cov(x.T, correction=0), rtol=1e-9, atol=1e-9)


def test_nothing_removed_is_identity():
    x = _correlated()
    cov = _moments(x)
    w, b = torch.randn(8, 24, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w_new, b_new = lsq_compensation(w, b, cov.mean, cov.cov, torch.arange(24), torch.tensor([], dtype=torch.long))
    assert torch.equal(w_new, w) and torch.equal(b_new, b)


def test_ratio_zero_lsq_keeps_logits():
    model = tiny_model("qwen2")
    ids = calibration()
    with torch.no_grad():
        before = model(ids).logits
    flap_llm.prune(model, ids, flap_llm.PruneConfig(ratio=0.0, compensation="lsq"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_linearly_dependent_removed_channels_are_reproduced_exactly():
    g = torch.Generator().manual_seed(3)
    x_k = torch.randn(3000, 10, generator=g, dtype=torch.float64) * 2 + 1
    mix = torch.randn(10, 6, generator=g, dtype=torch.float64)
    x_p = x_k @ mix + 0.5  # the removed channels are affine functions of the kept ones
    x = torch.cat([x_k, x_p], 1)
    kept, removed = torch.arange(10), torch.arange(10, 16)
    w, b = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    cov = _moments(x)
    w_k, b_new = lsq_compensation(w, b, cov.mean, cov.cov, kept, removed, damp=1e-12)
    torch.testing.assert_close(x_k @ w_k.T + b_new, x @ w.T + b, rtol=1e-7, atol=1e-7)
    # bias compensation alone cannot do that
    b_bias = bias_compensation(w, b, cov.mean, removed)
    assert (x_k @ w[:, kept].T + b_bias - (x @ w.T + b)).abs().max() > 1e-1


@pytest.mark.parametrize("damp", [1e-6, 1e-2, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsq_never_increases_reconstruction_error(damp, seed):
    x = _correlated(seed=seed)
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(12, 24, generator=g, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    removed = torch.randperm(24, generator=g)[:10].sort().values
    kept = torch.tensor([i for i in range(24) if i not in removed.tolist()])
    cov = _moments(x)
    ref = x @ w.T + b
    err_bias = ((x[:, kept] @ w[:, kept].T + bias_compensation(w, b, cov.mean, removed) - ref) ** 2).mean()
    w_k, b_lsq = lsq_compensation(w, b, cov.mean, cov.cov, kept, removed, damp=damp)
    err_lsq = ((x[:, kept] @ w_k.T + b_lsq - ref) ** 2).mean()
    assert err_lsq <= err_bias * (1 + 1e-12)
    if damp <= 1e-2:
        assert err_lsq < 0.9 * err_bias  # and on correlated data it really helps


def test_lsq_reduces_layer_reconstruction_error_in_a_model():
    """On the calibration data, each pruned down_proj reconstructs the dense output better with lsq."""
    ids = calibration(n=24)
    dense = tiny_model("llama-gqa")
    outs = {}
    for comp in ("bias", "lsq"):
        m = copy.deepcopy(dense)
        r = flap_llm.prune(m, ids, flap_llm.PruneConfig(ratio=0.5, compensation=comp))
        outs[comp] = (m, r)
    assert outs["bias"][1].plan == outs["lsq"][1].plan  # same plan; only compensation differs
    x = []
    h = dense.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: x.append(a[0]))
    with torch.no_grad():
        dense(ids)
    h.remove()
    x = x[0].reshape(-1, 96)
    kept = list(outs["bias"][1].plan.layers[0].channels)
    with torch.no_grad():
        ref = dense.model.layers[0].mlp.down_proj(x)
        err = {c: ((m.model.layers[0].mlp.down_proj(x[:, kept]) - ref) ** 2).mean().item() for c, (m, _) in outs.items()}
    assert err["lsq"] < err["bias"]


def test_sequential_lsq_runs_and_differs():
    ids = calibration(n=24)
    a, b = tiny_model("llama-mha", layers=3), tiny_model("llama-mha", layers=3)
    flap_llm.prune(a, ids, flap_llm.PruneConfig(ratio=0.5, compensation="lsq"))
    flap_llm.prune(b, ids, flap_llm.PruneConfig(ratio=0.5, compensation="lsq", sequential=True))
    # layer 0 sees the same (dense) inputs either way; later layers see pruned inputs when sequential
    torch.testing.assert_close(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    assert not torch.allclose(a.model.layers[2].mlp.down_proj.weight, b.model.layers[2].mlp.down_proj.weight)
