"""Method obs: the structured OBS path and the allocation on hand-made tensors, then the method on tiny models."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

import flap_llm
from conftest import ARCHS, calibration, tiny_model
from flap_llm import FlapError, PruneConfig, load_pruned, prune, save_pruned
from flap_llm.config import FISHER_FRACTION
from flap_llm.fisher import window_selected
from flap_llm.methods import flap as flap_method
from flap_llm.methods import obs as obs_method
from flap_llm import reconstruct
from flap_llm.reconstruct import allocate, damped, held_out_moment, refit_change, refit_error, removal_path
from flap_llm.stats import Covariance, SplitCovariance


def _problem(d: int, d_out: int, seed: int, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x[:, 0] *= 5  # an outlier channel, as down_proj inputs have
    w = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    return w, damped(torch.cov(x.T, correction=0), 0.01)


def _columns(units: torch.Tensor, size: int) -> torch.Tensor:
    return (units[:, None] * size + torch.arange(size)).flatten()


@pytest.mark.parametrize("seed", range(4))
def test_path_error_is_the_refit_error_of_every_prefix(seed):
    w, h = _problem(10, 6, seed)
    path = removal_path(w, h, 1, 9)
    assert path.order.tolist() != list(range(9)) and sorted(path.order.tolist()) == sorted(set(path.order.tolist()))
    for k in range(10):
        assert float(path.error[k]) == pytest.approx(float(refit_error(w, h, path.order[:k])), rel=1e-9, abs=1e-12)
    assert bool((path.error[1:] >= path.error[:-1] - 1e-12).all())


@pytest.mark.parametrize("seed", range(4))
def test_greedy_step_against_brute_force(seed):
    """The first greedy step is the best single removal; every greedy prefix is within reach of the best
    subset of its size and never below it."""
    w, h = _problem(9, 5, seed)
    path = removal_path(w, h, 1, 8)
    for k in range(1, 9):
        best = min(float(refit_error(w, h, torch.tensor(s))) for s in itertools.combinations(range(9), k))
        assert float(path.error[k]) >= best - 1e-9
        if k == 1:
            assert float(path.error[1]) == pytest.approx(best, rel=1e-12)
    # greedy is optimal on half of the prefixes at least, and beats removing by the diagonal score (FLAP's
    # WIFV: variance times squared column norm, no refit in view) over the whole path
    hits = sum(float(path.error[k]) <= 1.0001 * min(float(refit_error(w, h, torch.tensor(s)))
                                                   for s in itertools.combinations(range(9), k)) for k in range(1, 9))
    assert hits >= 4
    diagonal = torch.sort((w ** 2).sum(0) * h.diagonal(), stable=True).indices
    assert float(path.error.sum()) < float(removal_path(w, h, 1, 8, order=diagonal).error.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_scores_after_set_num_threads(dtype):
    """Each unit's tr(W_U (Q_UU)^-1 W_U^T) against a direct solve, after torch.set_num_threads (with it, the CPU
    build's batched LU solve raised "Pivots given to lu_solve must all be greater or equal to 1" and obs
    stopped); a block too ill-conditioned for a Cholesky factor in float32 still gets its score."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 192, 400, generator=g, dtype=torch.float64)  # the size of SmolLM2's KV groups, where it failed
    blocks = a @ a.transpose(1, 2) / 400 + 0.01 * torch.eye(192, dtype=torch.float64)
    blocks[2] = torch.eye(192, dtype=torch.float64)
    blocks[2, 0, 0] = -1.0  # indefinite: no Cholesky factor, the solve still defined
    w = torch.randn(576, 4 * 192, generator=g, dtype=torch.float64)
    cols = torch.arange(4 * 192).reshape(4, 192)
    want = torch.stack([(w[:, c] @ torch.linalg.solve(b, w[:, c].T)).trace() for b, c in zip(blocks, cols)])
    torch.set_num_threads(torch.get_num_threads())
    got = reconstruct._unit_scores(w.to(dtype), blocks.to(dtype), cols)
    torch.testing.assert_close(got.double(), want, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=0)


def test_group_units_and_blocks_and_given_order():
    w, h = _problem(12, 4, 7)
    groups = removal_path(w, h, 3, 3)  # 4 units of 3 columns
    for k in range(4):
        assert float(groups.error[k]) == pytest.approx(float(refit_error(w, h, _columns(groups.order[:k], 3))), rel=1e-9)
    best = min(float(refit_error(w, h, _columns(torch.tensor([u]), 3))) for u in range(4))
    assert float(groups.error[1]) == pytest.approx(best, rel=1e-12)
    blocked = removal_path(w, h, 1, 9, block=3)  # exact at the block boundaries
    for k in (3, 6, 9):
        assert float(blocked.error[k]) == pytest.approx(float(refit_error(w, h, blocked.order[:k])), rel=1e-9)
    order = torch.tensor([5, 0, 11, 2])
    forced = removal_path(w, h, 1, 4, order=order)
    assert forced.order.tolist() == order.tolist()
    assert float(forced.error[4]) == pytest.approx(float(refit_error(w, h, order)), rel=1e-9)


def test_path_refuses_bad_shapes():
    w, h = _problem(6, 3, 0)
    with pytest.raises(FlapError, match="unit_size"):
        removal_path(w, h, 4, 1)
    with pytest.raises(FlapError, match="cannot remove"):
        removal_path(w, h, 1, 7)


def _exhaustive(curves, costs, budget):
    """The least summed error over allocations that remove within one channel (cost 1) of the budget."""
    best = None
    for ks in itertools.product(*[range(c.numel()) for c in curves]):
        if budget - 1 < sum(k * c for k, c in zip(ks, costs)) <= budget + 1e-9:
            e = sum(float(c[k]) for c, k in zip(curves, ks))
            best = e if best is None else min(best, e)
    return best


def _objective(curves, ks):
    return sum(float(c[k]) for c, k in zip(curves, ks))


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_optimal_on_convex_curves_with_equal_costs(seed):
    g = torch.Generator().manual_seed(seed)
    curves = [torch.cat([torch.zeros(1), torch.cumsum(torch.sort(torch.rand(5, generator=g, dtype=torch.float64)).values, 0)])
              for _ in range(3)]
    for budget in range(0, 16):
        ks = allocate(curves, [1.0] * 3, budget)
        assert sum(ks) == budget
        assert _objective(curves, ks) == pytest.approx(_exhaustive(curves, [1.0] * 3, budget), abs=1e-12)


def test_allocation_takes_the_hull_past_a_bump():
    """A module whose second unit is dear but whose third and fourth are free is worth opening."""
    bumpy = torch.tensor([0.0, 0.1, 1.0, 1.0, 1.0], dtype=torch.float64)
    steady = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.2], dtype=torch.float64)
    ks = allocate([bumpy, steady], [1.0, 1.0], 4)
    assert ks == [4, 0]
    assert _objective([bumpy, steady], ks) == pytest.approx(_exhaustive([bumpy, steady], [1.0, 1.0], 4))


def test_allocation_against_exhaustive_on_a_tiny_model():
    """The real error curves of a tiny model's modules, with groups dearer than channels: the allocation is
    within the budget and its summed error within one unit's step of the exhaustive optimum."""
    model = tiny_model("llama-mha", layers=2)
    from flap_llm.arch import dims_of, spec_of
    from flap_llm.walk import output_projections
    from flap_llm.stats import Covariance
    from flap_llm.walk import record_inputs, forward_all, capture_inputs
    spec, dims = spec_of(model), dims_of(model)
    batches = list(calibration().split(4))
    first, kwargs = capture_inputs(model, spec, batches)
    inputs = [(h, k) for (h, _), k in zip(first, kwargs[0])]
    layer = model.model.layers[0]
    proj = output_projections(layer, spec)
    covs = {k: Covariance(m.in_features) for k, m in proj.items()}
    with torch.no_grad(), record_inputs(proj, covs):
        forward_all(layer, inputs, keep=False)
    attn = removal_path(proj["attn"].weight, damped(covs["attn"].cov, 0.01), 16, 4).error
    mlp = removal_path(proj["mlp"].weight, damped(covs["mlp"].cov, 0.01), 1, 50).error
    curves, costs = [attn, mlp], [dims.group_weight, 1.0]
    for budget in (0, 5, 12, 20, 30, 45, 60):
        ks = allocate(curves, costs, budget)
        assert budget - 1 < sum(k * c for k, c in zip(ks, costs)) <= budget + 1e-9
        opt = _exhaustive(curves, costs, budget)
        step = max(float((c[1:] - c[:-1]).max()) for c in curves)
        assert opt <= _objective(curves, ks) <= opt + step


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# the families method obs is offered for (Gemma 3's is refused: test_obs_refused_where_a_norm_follows_the_projections)
OBS_ARCHS = [a for a in ARCHS if a != "gemma3"]


@pytest.mark.parametrize("arch", OBS_ARCHS)
def test_obs_metric_structure_is_flap_lsq(arch):
    """With FLAP's selection and allocation (and the same ridge), obs is FLAP + lsq exactly: the parts are
    separable."""
    model, cal = tiny_model(arch), calibration()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prune(a, cal, PruneConfig(ratio=0.3, compensation="lsq"))
    rb = prune(b, cal, PruneConfig(ratio=0.3, method="obs", selection="metric", allocation="structure",
                                   sequential=False, lsq_damp=0.01))
    assert ra.plan == rb.plan
    ids = calibration(3, 16, seed=5)
    assert torch.equal(_logits(a, ids), _logits(b, ids))


@pytest.mark.parametrize("arch", OBS_ARCHS)
@pytest.mark.parametrize("sequential", [False, True])
def test_obs_mask_equals_prune_and_reloads(arch, sequential, tmp_path):
    model, cal = tiny_model(arch), calibration()
    cfg = PruneConfig(ratio=0.4, method="obs", sequential=sequential)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    rp = prune(pruned, cal, cfg)
    rm = prune(masked, cal, PruneConfig(**{**cfg.to_dict(), "mode": "mask"}))
    assert rp.plan == rm.plan
    assert rp.report["compensation"] == "lsq"
    assert rp.report["params"]["decoder_removed_fraction"] == pytest.approx(0.4, abs=0.01)
    ids = calibration(3, 16, seed=5)
    assert torch.allclose(_logits(pruned, ids), _logits(masked, ids), atol=1e-4)
    save_pruned(pruned, tmp_path / "ckpt", result=rp)
    again = load_pruned(tmp_path / "ckpt")
    assert torch.equal(_logits(pruned, ids), _logits(again, ids))
    # the plan is data: applying it to the dense model with the same per-layer refit gives the same model
    assert flap_llm.PrunePlan.from_dict(rp.plan.to_dict()) == rp.plan


@pytest.mark.parametrize("arch, fraction", [("llama-gqa", 1.0), ("phi3", 1.0), ("llama-gqa", 0.5)])
@pytest.mark.parametrize("allocation", ["measured", "structure"])
def test_covariances_recorded_in_the_fisher_pass_equal_the_walks(arch, fraction, allocation, monkeypatch):
    """The dense covariances come from the Fisher pass's forward when they fit, else from a walk of their own:
    the same plan and the same refit weights either way, and one pass fewer over the model (with a Fisher
    from part of the windows, the others still pass once, through the decoder only)."""
    model, cal = tiny_model(arch), calibration()
    cfg = PruneConfig(ratio=0.4, method="obs", allocation=allocation, fisher_fraction=fraction)
    assert obs_method.covariance_bytes(flap_llm.arch.dims_of(model)) <= obs_method.fused_budget(torch.device("cpu"))
    windows = {True: 0, False: 0}  # windows through layer 0, fused or walked
    runs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(obs_method, "fused_budget", lambda device: 0)
        m = copy.deepcopy(model)
        first = m.model.layers[0]

        def count(mod, args, kwargs, fused=fused):
            windows[fused] += (args[0] if args else kwargs["hidden_states"]).shape[0]
        hook = first.register_forward_pre_hook(count, with_kwargs=True)
        runs[fused] = (prune(m, cal, cfg), m)
        hook.remove()
    (rf, mf), (rw, mw) = runs[True], runs[False]
    assert rf.plan == rw.plan
    ids = calibration(3, 16, seed=5)
    torch.testing.assert_close(_logits(mf, ids), _logits(mw, ids), rtol=1e-4, atol=1e-5)
    n, picked = cal.shape[0], int(window_selected(cal, 0, fraction).sum())
    assert 0 < picked <= n and (picked == n) == (fraction == 1.0)
    # walked: the Fisher's windows, then the walk's capture of layer 0's inputs and its forward (2n);
    # fused: every window once
    assert windows[False] - windows[True] == picked + 2 * n - n


def test_obs_lowers_the_layer_error_below_flap_lsq():
    """On a tiny model at the same per-layer counts, OBS selection leaves less output error than FLAP's
    metric order does: the sum over the layers' refit errors of the chosen sets, measured directly."""
    model, cal = tiny_model("llama-mha", layers=2), calibration(24)
    ids = calibration(8, 16, seed=9)
    dense = _logits(model, ids)
    errs = {}
    for sel in ("metric", "obs"):
        m = copy.deepcopy(model)
        prune(m, cal, PruneConfig(ratio=0.4, method="obs", selection=sel, allocation="structure", structure="UL-UM"))
        errs[sel] = float((_logits(m, ids) - dense).pow(2).mean())
    assert errs["obs"] < errs["metric"]


def test_obs_is_sequential_unless_told_otherwise():
    assert PruneConfig(method="obs").sequential is True
    assert PruneConfig(method="obs", sequential=False).sequential is False
    assert PruneConfig(compensation="lsq").sequential is False
    assert PruneConfig.from_dict(PruneConfig(method="obs").to_dict()).sequential is True
    with pytest.raises(FlapError, match="sequential"):
        PruneConfig(sequential="yes")


def test_lsq_damp_defaults_to_the_methods():
    """obs refits with a larger ridge than FLAP's lsq unless told; a saved config keeps what it ran with."""
    assert PruneConfig(method="obs").lsq_damp == 0.1
    assert PruneConfig(compensation="lsq").lsq_damp == 0.01
    assert PruneConfig(method="obs", lsq_damp=0.01).lsq_damp == 0.01
    assert PruneConfig.from_dict({"method": "obs", "lsq_damp": 0.01}).lsq_damp == 0.01
    assert PruneConfig.from_dict(PruneConfig(method="obs").to_dict()).lsq_damp == 0.1
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(FlapError, match="lsq_damp must be positive"):
            PruneConfig(method="obs", lsq_damp=bad)


def test_fisher_fraction_is_checked_and_kept():
    assert PruneConfig(method="obs").fisher_fraction == FISHER_FRACTION
    assert PruneConfig(method="flap").fisher_fraction is None
    assert PruneConfig.from_dict({"method": "obs"}).fisher_fraction == 1.0  # saved before the option: all windows
    assert PruneConfig.from_dict(PruneConfig(method="obs", fisher_fraction=0.5).to_dict()).fisher_fraction == 0.5
    for bad in (0, -0.5, 1.5, True, "0.5"):
        with pytest.raises(FlapError, match="fisher_fraction must be in"):
            PruneConfig(method="obs", fisher_fraction=bad)
    with pytest.raises(FlapError, match="option of method obs"):
        PruneConfig(compensation="lsq", fisher_fraction=0.5)


def test_obs_options_are_checked():
    with pytest.raises(FlapError, match="selection"):
        PruneConfig(method="obs", selection="best")
    with pytest.raises(FlapError, match="options of method obs"):
        PruneConfig(method="flap", allocation="structure")
    with pytest.raises(FlapError, match="least squares"):
        PruneConfig(method="obs", compensation="none")
    with pytest.raises(FlapError, match="remove_heads"):
        PruneConfig(method="obs", allocation="structure", structure="AL-MM")
    PruneConfig(method="obs", allocation="structure", structure="AL-MM", remove_heads=1)


@pytest.mark.parametrize("unit_size, block", [(1, 4), (3, 1)])
def test_pending_steps_give_the_path_of_steps_applied_at_once(unit_size, block, monkeypatch):
    """The path keeps each step's update of the inverse (and its held-out score) pending until a flush: with
    room for one step only, every step is flushed before the next, i.e. applied at once as in the plain
    greedy; the units and both curves are the same as with the default room."""
    g = torch.Generator().manual_seed(7)
    d, n = 48, 400
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    xa = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    xb = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.1
    w = torch.randn(12, d, generator=g, dtype=torch.float64)
    h = damped(torch.cov(xa.T, correction=0), 0.05)
    v = held_out_moment(torch.cov(xb.T, correction=0), xb.mean(0), xa.mean(0))
    default = removal_path(w, h, unit_size, d // unit_size - 2, block, held_out=v)
    flushed = []
    monkeypatch.setattr(reconstruct, "_pending_capacity", lambda d, widest: widest)
    real_flush = reconstruct._Pending.flush
    monkeypatch.setattr(reconstruct._Pending, "flush", lambda self, keep=None: (flushed.append(self.n),
                                                                                real_flush(self, keep)))
    eager = removal_path(w, h, unit_size, d // unit_size - 2, block, held_out=v)
    steps = -(-(d // unit_size - 2) // block)
    assert max(flushed) <= block * unit_size and len(flushed) >= steps  # a flush per step
    assert torch.equal(eager.order, default.order)
    torch.testing.assert_close(eager.error, default.error, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager.held_out, default.held_out, rtol=1e-5, atol=1e-9)  # float32 products


@pytest.mark.parametrize("unit_size, block", [(1, 1), (1, 3), (4, 1), (2, 2)])
def test_held_out_curve_scores_each_prefix_refit_on_other_inputs(unit_size, block):
    """The path's held-out curve is, for every prefix, the refit fitted on one set of inputs scored on
    another: against the refit solved directly, and against the mean squared output change on the held-out
    inputs themselves (the refit bias absorbs the calibration mean)."""
    g = torch.Generator().manual_seed(unit_size * 10 + block)
    d, n = 24, 200
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    xa = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5
    xb = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.2  # another sample, another mean
    w = torch.randn(10, d, generator=g, dtype=torch.float64)
    h = damped(torch.cov(xa.T, correction=0), 0.05)
    v = held_out_moment(torch.cov(xb.T, correction=0), xb.mean(0), xa.mean(0))
    path = removal_path(w, h, unit_size, d // unit_size - 1, block, held_out=v)
    assert path.held_out.shape == path.error.shape and float(path.held_out[0]) == 0.0
    for k in range(0, path.order.numel() + 1, block):  # prefixes that end a step are exact
        change = refit_change(w, h, _columns(path.order[:k], unit_size))
        direct = float(((xb - xa.mean(0)) @ change.T).pow(2).sum(1).mean())
        assert float(path.held_out[k]) == pytest.approx(direct, rel=1e-5, abs=1e-9)
        # and the fit curve is the same refits scored on their own inputs
        assert float(path.error[k]) == pytest.approx(float((change @ h * change).sum()), rel=1e-6, abs=1e-9)
    assert removal_path(w, h, unit_size, 3, block).held_out is None


def test_float32_path_follows_the_float64_one():
    """The held-out folds' paths work in float32: on a wide, correlated layer with a few outlier channels they
    take the same units as in float64 and their curves agree to 1e-5."""
    g = torch.Generator().manual_seed(3)
    d, n = 192, 2000
    scale = torch.ones(d, dtype=torch.float64)
    scale[:4] = 20.0  # outlier channels, as real MLP inputs have
    mix = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    xa = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale
    xb = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale
    w = torch.randn(32, d, generator=g, dtype=torch.float64)
    h = damped(torch.cov(xa.T, correction=0), 0.1)
    v = held_out_moment(torch.cov(xb.T, correction=0), xb.mean(0), xa.mean(0))
    exact = removal_path(w, h, 1, 170, 4, held_out=v)
    fast = removal_path(w, h, 1, 170, 4, held_out=v, dtype=torch.float32)
    assert fast.error.dtype == fast.held_out.dtype == torch.float64
    assert torch.equal(fast.order, exact.order)
    torch.testing.assert_close(fast.error, exact.error, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fast.held_out, exact.held_out, rtol=1e-5, atol=1e-9)


def test_split_covariance_halves_alternate_windows_and_merge_to_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 6, generator=g)  # 5 windows of 7 tokens
    split, whole = SplitCovariance(6), Covariance(6)
    split.update(x[:3])
    split.update(x[3:])  # a second batch: its windows are windows 3 and 4 of the whole
    whole.update(x)
    first, second = split.halves
    assert (first.n, second.n) == (3 * 7, 2 * 7)
    ref = Covariance(6)
    ref.update(x[0::2])
    torch.testing.assert_close(first.sum, ref.sum)
    torch.testing.assert_close(first.outer, ref.outer)
    # batches run in two groups (rows: their windows' positions) split as the batches would
    grouped = SplitCovariance(6)
    for rows in ([1, 2], [0], [4], [3]):
        grouped.rows = torch.tensor(rows)
        grouped.update(x[rows])
    for a, b in zip(grouped.halves, split.halves):
        assert a.n == b.n
        torch.testing.assert_close(a.outer, b.outer)
        torch.testing.assert_close(a.sum, b.sum)
    # one window per batch still fills both halves
    single = SplitCovariance(6)
    for i in range(5):
        single.update(x[i:i + 1])
    assert [h.n for h in single.halves] == [h.n for h in split.halves]
    torch.testing.assert_close(single.halves[1].outer, second.outer)
    merged = split.merged()
    assert merged.n == whole.n
    torch.testing.assert_close(merged.cov, whole.cov)
    torch.testing.assert_close(merged.mean, whole.mean)


def test_fused_budget_is_capped_by_the_available_memory(monkeypatch):
    free = obs_method.available_bytes(torch.device("cpu"))
    assert free is not None and free > 0  # Linux's MemAvailable
    monkeypatch.setattr(obs_method, "available_bytes", lambda device: 4 * 2**30)
    assert obs_method.fused_budget(torch.device("cpu")) == int(obs_method.FUSED_COVARIANCE_SHARE * 4 * 2**30)
    monkeypatch.setattr(obs_method, "available_bytes", lambda device: 64 * 2**30)
    assert obs_method.fused_budget(torch.device("cpu")) == obs_method.FUSED_COVARIANCE_BYTES
    monkeypatch.setattr(obs_method, "available_bytes", lambda device: None)
    assert obs_method.fused_budget(torch.device("cpu")) == obs_method.FUSED_COVARIANCE_BYTES


@pytest.mark.parametrize("arch, fraction", [("llama-gqa", 1.0), ("qwen3", 1.0), ("llama-gqa", 0.5)])
def test_obs_held_out_allocation_prunes_masks_and_reloads(arch, fraction, tmp_path, monkeypatch):
    """allocation="held-out": the budget is met, mask == prune, the checkpoint reloads exactly, and the
    fused (Fisher-pass) and walked covariances give the same plan, also when the Fisher pass runs each batch's
    windows in two groups and at other batch sizes (each window goes to the half of its index in the
    calibration set)."""
    model, cal = tiny_model(arch), calibration(16)
    cfg = PruneConfig(ratio=0.4, method="obs", allocation="held-out", fisher_fraction=fraction)
    picked = int(window_selected(cal, 0, fraction).sum())
    assert 0 < picked <= cal.shape[0] and (picked == cal.shape[0]) == (fraction == 1.0)
    assert cfg.label == "obs, obs selection, held-out allocation"
    pruned, masked, walked = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    rp = prune(pruned, cal, cfg)
    rm = prune(masked, cal, PruneConfig(**{**cfg.to_dict(), "mode": "mask"}))
    assert rp.plan == rm.plan
    assert rp.report["params"]["decoder_removed_fraction"] == pytest.approx(0.4, abs=0.01)
    ids = calibration(3, 16, seed=5)
    assert torch.allclose(_logits(pruned, ids), _logits(masked, ids), atol=1e-4)
    save_pruned(pruned, tmp_path / "ckpt", result=rp)
    assert torch.equal(_logits(pruned, ids), _logits(load_pruned(tmp_path / "ckpt"), ids))
    # the halves do not depend on the batching (below: one window per batch still fills both)
    assert prune(copy.deepcopy(model), cal, cfg, batch_size=3).plan == rp.plan
    monkeypatch.setattr(obs_method, "fused_budget", lambda device: 0)
    assert prune(walked, cal, cfg).plan == rp.plan
    assert prune(copy.deepcopy(model), cal, cfg, batch_size=1).plan == rp.plan
    # the held-out curves are not the fit curves: the allocation differs from "measured" here
    fit = prune(copy.deepcopy(model), cal, PruneConfig(ratio=0.4, method="obs", allocation="measured",
                                                       fisher_fraction=fraction))
    assert fit.plan != rp.plan


def test_select_damp_defaults_to_0_01_and_is_checked():
    assert PruneConfig(method="obs").select_damp == 0.01
    assert PruneConfig(method="obs").lsq_damp == 0.1
    assert PruneConfig(method="obs", lsq_damp=0.03).select_damp == 0.01  # its own default, whatever the refit's
    assert PruneConfig(method="obs", select_damp=0.2).select_damp == 0.2
    assert PruneConfig(compensation="lsq").select_damp is None
    # saved before the option existed: one ridge for both, as those runs had
    assert PruneConfig.from_dict({"method": "obs", "lsq_damp": 0.3}).select_damp == 0.3
    assert PruneConfig.from_dict({"method": "obs"}).select_damp == 0.1
    assert PruneConfig.from_dict({"method": "flap", "compensation": "lsq"}).select_damp is None
    assert PruneConfig.from_dict(PruneConfig(method="obs").to_dict()).select_damp == 0.01
    assert PruneConfig.from_dict(PruneConfig(method="obs", select_damp=0.2).to_dict()).select_damp == 0.2
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(FlapError, match="select_damp must be positive"):
            PruneConfig(method="obs", select_damp=bad)
    with pytest.raises(FlapError, match="select_damp is an option of method obs"):
        PruneConfig(compensation="lsq", select_damp=0.01)


@pytest.mark.parametrize("allocation, sequential", [("held-out", True), ("measured", False)])
def test_select_damp_only_changes_the_greedy_choice(allocation, sequential, monkeypatch):
    """select_damp changes which units the refit pass's greedy takes (its paths run at select_damp) but not how
    many (the allocation's paths, and the refit, keep lsq_damp); the default chooses at 0.01."""
    model, cal = tiny_model("llama-gqa"), calibration(16)
    base = dict(ratio=0.4, method="obs", allocation=allocation, sequential=sequential)
    runs = {}
    calls = []
    paths = obs_method._paths

    def spy(*args, **kwargs):
        calls.append(kwargs.get("damp"))  # the ridge asked for (None: lsq_damp)
        return paths(*args, **kwargs)

    refits = []
    lsq_update = flap_method._lsq_update

    def refit_spy(*args):
        refits.append(args[-1])  # the refit's ridge
        return lsq_update(*args)

    monkeypatch.setattr(obs_method, "_paths", spy)
    monkeypatch.setattr(flap_method, "_lsq_update", refit_spy)
    for name, extra in (("default", {}), ("one", {"select_damp": 0.1}), ("large", {"select_damp": 1e4})):
        calls.clear()
        m = copy.deepcopy(model)
        runs[name] = (prune(m, cal, PruneConfig(**base, **extra)).plan, list(calls))
    n = len(runs["default"][0].layers)
    assert runs["default"][1].count(0.01) == n  # the default chooses at 0.01
    plan = runs["large"][0]
    assert plan != runs["one"][0]
    counts = [(len(a.heads), len(a.channels)) for a in plan.layers]
    assert counts == [(len(a.heads), len(a.channels)) for a in runs["one"][0].layers]
    assert counts == [(len(a.heads), len(a.channels)) for a in runs["default"][0].layers]
    # the refit pass's greedy asks for select_damp once per layer; the allocation's paths for lsq_damp
    large_calls = runs["large"][1]
    assert large_calls.count(1e4) == n
    assert all(d is None for d in large_calls if d != 1e4)
    assert len(large_calls) == n + (2 * n if allocation == "held-out" else n)
    assert refits and set(refits) == {0.1}  # every refit (two per layer, three runs) at lsq_damp
    assert len(refits) == 3 * 2 * n
    if allocation == "measured":  # non-sequential with one ridge: the dense paths are reused, not recomputed
        assert runs["one"][1] == [None] * n


@pytest.mark.parametrize("options", [{}, dict(selection="metric", allocation="structure")])
def test_obs_refused_where_a_norm_follows_the_projections(options):
    """Gemma 3 puts a norm right after o_proj and down_proj: obs is refused before anything changes, and the
    message names what to use instead."""
    model = tiny_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(flap_llm.FlapError, match=r"not offered for Gemma3ForCausalLM.*--method flap --compensation lsq"):
        prune(model, calibration(), PruneConfig(ratio=0.4, method="obs", **options))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert prune(model, calibration(), PruneConfig(ratio=0.4, compensation="lsq")).report["compensation"] == "lsq"
