"""Method obs: the structured OBS path and the allocation on hand-made tensors, then the method on tiny models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import flap_llm
from conftest import ARCHS, calibration, tiny_model
from flap_llm import FlapError, PruneConfig, load_pruned, prune, save_pruned
from flap_llm import FlapOptions, ObsOptions
from flap_llm.calibration.fisher import window_selected
from flap_llm.methods import flap as flap_method
from flap_llm.methods import obs as obs_method
from flap_llm.math import reconstruct
from flap_llm.math.reconstruct import allocate, damped, held_out_moment, refit_change, refit_error, removal_path
from flap_llm.math.stats import Covariance, SplitCovariance


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
    from flap_llm.model.arch import dims_of, spec_of
    from flap_llm.calibration.walk import output_projections
    from flap_llm.math.stats import Covariance
    from flap_llm.calibration.walk import record_inputs, forward_all, capture_inputs
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
def test_obs_mask_equals_prune_and_reloads(arch, tmp_path):
    model, cal = tiny_model(arch), calibration()
    cfg = PruneConfig(ratio=0.4, method="obs", options=ObsOptions(allocation="measured"))
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    rp = prune(pruned, cal, cfg)
    rm = prune(masked, cal, PruneConfig.from_dict({**cfg.to_dict(), "mode": "mask"}))
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
@pytest.mark.parametrize("allocation", ["measured", "held-out"])
def test_covariances_recorded_in_the_fisher_pass_equal_the_walks(arch, fraction, allocation, monkeypatch):
    """The dense covariances come from the Fisher pass's forward when they fit, else from a walk of their own:
    the same plan and the same refit weights either way, and one pass fewer over the model (with a Fisher
    from part of the windows, the others still pass once, through the decoder only)."""
    monkeypatch.setattr(obs_method, "FISHER_FRACTION", fraction)
    model, cal = tiny_model(arch), calibration()
    cfg = PruneConfig(ratio=0.4, method="obs", options=ObsOptions(allocation=allocation))
    assert obs_method.covariance_bytes(flap_llm.model.arch.dims_of(model)) <= obs_method.fused_budget(torch.device("cpu"))
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


def test_obs_options_hold_only_what_applies():
    """ObsOptions: the allocation and the refit's ridge, defaults 'held-out' and 0.1; 0.1's flat keywords fill it;
    the options that were deleted are refused with the reason (or accepted where they hold today's fixed value)."""
    cfg = PruneConfig(method="obs")
    assert cfg.options == ObsOptions() == ObsOptions(allocation="held-out", lsq_damp=0.1)
    assert cfg.to_dict() == {"ratio": 0.2, "method": "obs", "options": {"allocation": "held-out", "lsq_damp": 0.1},
                             "mode": "prune", "align": None}
    assert cfg.label == "obs, held-out allocation" and cfg.effective_compensation == "lsq"
    assert PruneConfig(method="obs", lsq_damp=0.01, allocation="measured").options == ObsOptions("measured", 0.01)
    assert PruneConfig(method="obs", sequential=True, selection="obs", compensation="lsq").options == ObsOptions()
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    for bad, words in ((dict(sequential=False), "sequential is no longer an option of method obs"),
                       (dict(selection="metric"), "selection is no longer"), (dict(fisher_fraction=0.5), "internal"),
                       (dict(select_damp=0.01), "internal"), (dict(token_windows=16), "measured worse"),
                       (dict(compensation="none"), "always refits by least squares"),
                       (dict(metric="IFV"), "metric is not an option of method obs"),
                       (dict(allocation="structure"), "unknown allocation 'structure'")):
        with pytest.raises(FlapError, match=words):
            PruneConfig(method="obs", **bad)
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(FlapError, match="lsq_damp must be positive"):
            ObsOptions(lsq_damp=bad)
    with pytest.raises(FlapError, match="takes ObsOptions, got FlapOptions"):
        PruneConfig(method="obs", options=FlapOptions())
    with pytest.raises(FlapError, match="either options= or the flat keywords"):
        PruneConfig(method="obs", options=ObsOptions(), lsq_damp=0.1)


def test_flap_options_hold_only_what_applies():
    """FlapOptions: the paper's metric, structure, compensation; lsq_damp and sequential only with lsq."""
    cfg = PruneConfig(ratio=0.5)
    assert cfg.options == FlapOptions() and cfg.to_dict()["options"] == {"metric": "WIFV", "structure": "AL-AM",
                                                                        "compensation": "bias"}
    lsq = PruneConfig(ratio=0.5, compensation="lsq")
    assert lsq.options == FlapOptions(compensation="lsq", lsq_damp=0.01, sequential=False)
    assert lsq.to_dict()["options"] == {"metric": "WIFV", "structure": "AL-AM", "compensation": "lsq",
                                        "lsq_damp": 0.01, "sequential": False}
    assert PruneConfig(metric="IFV", structure="UL-MM", remove_heads=2).options.remove_heads == 2
    assert PruneConfig.from_dict(lsq.to_dict()) == lsq
    for bad, words in ((dict(lsq_damp=0.1), "options of compensation lsq"), (dict(sequential=True), "compensation lsq"),
                       (dict(structure="AL-MM"), "needs remove_heads"), (dict(remove_heads=1), "goes with structure"),
                       (dict(allocation="measured"), "allocation: not an option of method flap"),
                       (dict(metric="L2"), "unknown metric")):
        with pytest.raises(FlapError, match=words):
            PruneConfig(**bad)
    with pytest.raises(FlapError, match="method wanda-sp has no options"):
        PruneConfig(method="wanda-sp", compensation="lsq")
    assert PruneConfig(method="mag-sp").options is None and PruneConfig(method="mag-sp").to_dict()["options"] is None


def test_configs_saved_by_0_1_read_back():
    """0.1 saved every field flat, the obs-only ones included (a plain FLAP run recorded "selection": "obs"):
    they read back as the method's options, the deleted ones dropped."""
    flap_01 = {"ratio": 0.2, "method": "flap", "metric": "WIFV", "structure": "AL-AM", "remove_heads": None,
               "compensation": "lsq", "mode": "prune", "lsq_damp": 0.01, "sequential": False, "align": None,
               "selection": "obs", "allocation": "held-out", "fisher_fraction": None, "select_damp": None,
               "token_windows": None, "token_shrink": None, "token_reference": None}
    assert PruneConfig.from_dict(flap_01) == PruneConfig(ratio=0.2, options=FlapOptions(compensation="lsq"))
    obs_01 = {**flap_01, "method": "obs", "compensation": "bias", "lsq_damp": 0.1, "sequential": True,
              "fisher_fraction": 0.5, "select_damp": 0.01, "token_windows": 16, "token_shrink": True,
              "token_reference": "uniform"}
    assert PruneConfig.from_dict(obs_01) == PruneConfig(method="obs")
    ablation = {**obs_01, "selection": "metric", "allocation": "structure", "sequential": False}
    assert PruneConfig.from_dict(ablation).options == ObsOptions()


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
    monkeypatch.setattr(obs_method, "FISHER_FRACTION", fraction)
    """allocation="held-out": the budget is met, mask == prune, the checkpoint reloads exactly, and the
    fused (Fisher-pass) and walked covariances give the same plan, also when the Fisher pass runs each batch's
    windows in two groups and at other batch sizes (each window goes to the half of its index in the
    calibration set)."""
    model, cal = tiny_model(arch), calibration(16)
    cfg = PruneConfig(ratio=0.4, method="obs")
    picked = int(window_selected(cal, 0, fraction).sum())
    assert 0 < picked <= cal.shape[0] and (picked == cal.shape[0]) == (fraction == 1.0)
    pruned, masked, walked = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    rp = prune(pruned, cal, cfg)
    rm = prune(masked, cal, PruneConfig(ratio=0.4, method="obs", mode="mask"))
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
    fit = prune(copy.deepcopy(model), cal, PruneConfig(ratio=0.4, method="obs", allocation="measured"))
    assert fit.plan != rp.plan


@pytest.mark.parametrize("allocation", ["held-out", "measured"])
def test_the_greedy_chooses_at_its_own_ridge_and_the_refit_at_lsq_damp(allocation, monkeypatch):
    """The refit pass's greedy takes its units at SELECT_DAMP; the allocation's paths and every refit keep
    lsq_damp, so the greedy's ridge changes which units go but not how many."""
    model, cal = tiny_model("llama-gqa"), calibration(16)
    calls, refits = [], []
    paths, lsq_update = obs_method._paths, flap_method._lsq_update

    def spy(*args, **kwargs):
        calls.append(kwargs.get("damp"))  # the ridge asked for (None: lsq_damp)
        return paths(*args, **kwargs)

    def refit_spy(*args):
        refits.append(args[-1])  # the refit's ridge
        return lsq_update(*args)
    monkeypatch.setattr(obs_method, "_paths", spy)
    monkeypatch.setattr(flap_method, "_lsq_update", refit_spy)
    cfg = PruneConfig(ratio=0.4, method="obs", allocation=allocation)
    runs = {}
    for select_damp in (0.01, 1e4):
        monkeypatch.setattr(obs_method, "SELECT_DAMP", select_damp)
        calls.clear()
        runs[select_damp] = (prune(copy.deepcopy(model), cal, cfg).plan, list(calls))
    n = len(runs[0.01][0].layers)
    assert obs_method.SELECT_DAMP == 1e4 and runs[0.01][1].count(0.01) == n
    assert runs[1e4][1].count(1e4) == n and all(d is None for d in runs[1e4][1] if d != 1e4)
    assert len(runs[1e4][1]) == n + (2 * n if allocation == "held-out" else n)
    a, b = runs[0.01][0], runs[1e4][0]
    assert a != b
    assert [(len(x.heads), len(x.channels)) for x in a.layers] == [(len(x.heads), len(x.channels)) for x in b.layers]
    assert set(refits) == {0.1} and len(refits) == 2 * 2 * n  # two refits per layer, two runs, at lsq_damp


@pytest.mark.parametrize("options", [{}, dict(allocation="measured")])
def test_obs_refused_where_a_norm_follows_the_projections(options):
    """Gemma 3 puts a norm right after o_proj and down_proj: obs is refused before anything changes, and the
    message names what to use instead."""
    model = tiny_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(flap_llm.FlapError, match=r"not offered for Gemma3ForCausalLM.*--method flap --compensation lsq"):
        prune(model, calibration(), PruneConfig(ratio=0.4, method="obs", **options))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert prune(model, calibration(), PruneConfig(ratio=0.4, compensation="lsq")).report["compensation"] == "lsq"
