"""The FLAP engine on tiny random models of every supported family."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import flap_llm
from flap_llm.model.arch import decoder_layers, decoder_weight_params, dims_of, output_proj, spec_of
from flap_llm.calibration.walk import as_batches, collect_statistics
from conftest import VOCAB, calibration, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ratio_zero_keeps_everything_and_logits(arch):
    model = tiny_model(arch)
    ids = calibration()
    before = logits(model, ids)
    result = flap_llm.prune(model, ids, flap_llm.PruneConfig(ratio=0.0))
    dims = dims_of(model)
    for lp in result.plan.to_dict()["layers"]:
        assert lp["heads"] == list(range(dims.n_heads))
        assert lp["kv_heads"] == list(range(dims.n_kv_heads))
        assert lp["channels"] == list(range(dims.d_ff))
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM", "AL-MM", "UL-MM"])
@pytest.mark.parametrize("compensation", ["bias", "none", "lsq"])
def test_mask_and_prune_give_same_logits(arch, structure, compensation):
    ids = calibration()
    cfg = dict(ratio=0.4, structure=structure, compensation=compensation,
               remove_heads=1 if structure.endswith("MM") else None)
    pruned, masked = tiny_model(arch), tiny_model(arch)
    r1 = flap_llm.prune(pruned, ids, flap_llm.PruneConfig(mode="prune", **cfg))
    r2 = flap_llm.prune(masked, ids, flap_llm.PruneConfig(mode="mask", **cfg))
    assert r1.plan == r2.plan
    a, b = logits(pruned, ids), logits(masked, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # prune mode really shrank the weights
    assert decoder_weight_params(pruned, spec_of(pruned)) < decoder_weight_params(masked, spec_of(masked))


@pytest.mark.parametrize("method", ["wanda-sp", "mag-sp"])
def test_baselines_mask_and_prune_agree(method):
    ids = calibration()
    pruned, masked = tiny_model("llama-gqa"), tiny_model("llama-gqa")
    r1 = flap_llm.prune(pruned, ids, flap_llm.PruneConfig(ratio=0.5, method=method))
    r2 = flap_llm.prune(masked, ids, flap_llm.PruneConfig(ratio=0.5, method=method, mode="mask"))
    assert r1.plan == r2.plan
    assert r1.report["compensation"] == "none"
    torch.testing.assert_close(logits(pruned, ids), logits(masked, ids), rtol=1e-5, atol=1e-5)
    # uniform: floor(0.5 * 2) = 1 group and floor(0.5 * 96) = 48 channels removed in every layer
    for c in r1.plan.kept_counts():
        assert (c["kv_heads"], c["channels"]) == (1, 48)
    # those are fewer parameters
    assert pruned.model.layers[0].mlp.down_proj.bias is None


def test_mag_sp_needs_no_data_and_keeps_largest_columns():
    model = tiny_model("llama-mha")
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = flap_llm.prune(model, None, flap_llm.PruneConfig(ratio=0.25, method="mag-sp"))
    norms = down.norm(dim=0)
    kept = result.plan.layers[0].channels
    expected = sorted(torch.argsort(norms, descending=True)[: 96 - 24].tolist())
    assert list(kept) == expected


def test_wanda_sp_is_sequential():
    """Layer 1's scores come from the pruned layer 0: a different plan than dense statistics give."""
    ids = calibration(n=16)
    model = tiny_model("llama-mha", layers=3)
    plan = flap_llm.prune(copy.deepcopy(model), ids, flap_llm.PruneConfig(ratio=0.5, method="wanda-sp")).plan
    from flap_llm.math import metrics
    from flap_llm.math.select import drop_lowest
    spec = spec_of(model)
    stats = collect_statistics(model, spec, as_batches(ids, 4, VOCAB))
    dense_ch = [drop_lowest(metrics.wanda_sp(s.mlp, layer.mlp.down_proj.weight), 48).tolist()
                for s, layer in zip(stats, model.model.layers)]
    assert list(plan.layers[0].channels) == dense_ch[0]  # layer 0 sees the same inputs
    assert any(list(plan.layers[i].channels) != dense_ch[i] for i in (1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_independent_of_batching(dtype):
    model = tiny_model("llama-gqa", dtype=dtype)
    spec = spec_of(model)
    ids = calibration(n=10)
    ref = collect_statistics(model, spec, as_batches(ids, 10, VOCAB))
    for bs in (1, 3, 7):
        # also split the windows into an uneven iterable of chunks
        chunks = [ids[:4], ids[4:5], ids[5:]]
        for batches in (as_batches(ids, bs, VOCAB), as_batches(chunks, bs, VOCAB)):
            other = collect_statistics(model, spec, batches)
            for s, r in zip(other, ref):
                for a, b in ((s.attn, r.attn), (s.mlp, r.mlp)):
                    assert a.n == b.n == 10 * 16
                    assert a.sum.dtype == torch.float64
                    torch.testing.assert_close(a.mean, b.mean, rtol=1e-9, atol=1e-12)
                    torch.testing.assert_close(a.var, b.var, rtol=1e-9, atol=1e-12)
                    torch.testing.assert_close(a.mean_sq, b.mean_sq, rtol=1e-9, atol=1e-12)


def _model_inputs(model, ids) -> list[dict[str, torch.Tensor]]:
    """The inputs of every layer's o_proj and down_proj in one ordinary forward of the whole model."""
    spec = spec_of(model)
    captured = [{} for _ in decoder_layers(model, spec)]
    handles = [output_proj(layer, spec, m).register_forward_pre_hook(
                   lambda mod, a, i=i, m=m: captured[i].__setitem__(m, a[0].reshape(-1, a[0].shape[-1]).double()))
               for i, layer in enumerate(decoder_layers(model, spec)) for m in ("attn", "mlp")]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return captured


def test_statistics_are_true_statistics(arch):
    """Mean and population variance of every layer's o_proj/down_proj inputs equal torch's over every token
    of an ordinary forward of the whole model (Gemma 3: each layer type gets its own mask and rotary table)."""
    model = tiny_model(arch, layers=3)
    ids = calibration(n=5)
    ref = _model_inputs(model, ids)
    stats = collect_statistics(model, spec_of(model), as_batches(ids, 2, VOCAB))
    for s, r in zip(stats, ref):
        for got, x in ((s.attn, r["attn"]), (s.mlp, r["mlp"])):
            torch.testing.assert_close(got.mean, x.mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-7)


def test_layer_zero_inputs_for_every_layer_would_be_wrong_for_gemma3(monkeypatch):
    """Negative control: handing every layer what layer 0 receives (the old walk) changes Gemma 3's statistics."""
    from flap_llm.calibration import walk as walk_mod
    model = tiny_model("gemma3", layers=3)
    ids = calibration(n=5)
    ref = _model_inputs(model, ids)
    real = walk_mod.capture_inputs

    def layer0_for_all(*args):
        first, per_layer = real(*args)
        return first, [per_layer[0]] * len(per_layer)

    monkeypatch.setattr(walk_mod, "capture_inputs", layer0_for_all)
    stats = collect_statistics(model, spec_of(model), as_batches(ids, 2, VOCAB))
    gap = (stats[1].attn.mean - ref[1]["attn"].mean(0)).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5, 0.7])
def test_al_am_hits_target_fraction_within_one_unit(arch, ratio):
    model = tiny_model(arch, layers=3)
    dims = dims_of(model)
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=ratio))
    removed = result.report["params"]["decoder_removed_fraction"]
    total_units = dims.n_layers * (dims.n_kv_heads * dims.group_weight + dims.d_ff)
    largest_unit = max(dims.group_weight, 1.0) / total_units
    assert ratio - 1e-9 <= removed < ratio + largest_unit


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.75])
def test_ul_um_removes_floor_ratio_units_per_layer(arch, ratio):
    model = tiny_model(arch, layers=3)
    dims = dims_of(model)
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=ratio, structure="UL-UM"))
    for c in result.plan.kept_counts():
        assert c["kv_heads"] == dims.n_kv_heads - math.floor(ratio * dims.n_kv_heads)
        assert c["heads"] == c["kv_heads"] * dims.group_size
        assert c["channels"] == dims.d_ff - math.floor(ratio * dims.d_ff)


def test_manual_structures_remove_exactly_remove_heads():
    for structure in ("UL-MM", "AL-MM"):
        model = tiny_model("llama-mha", layers=3)
        dims = dims_of(model)
        result = flap_llm.prune(model, calibration(),
                                flap_llm.PruneConfig(ratio=0.3, structure=structure, remove_heads=4))
        assert result.report["layers"]["kv_groups_kept"] == 3 * 4 - 4
        removed = result.report["params"]["decoder_removed_fraction"]
        per_channel = 1 / (dims.n_layers * (dims.n_kv_heads * dims.group_weight + dims.d_ff))
        slack = dims.n_layers * per_channel if structure == "UL-MM" else per_channel
        assert 0.3 - slack <= removed <= 0.3 + 1e-9


def test_ul_mm_spreads_heads_evenly():
    model = tiny_model("llama-mha", layers=3)
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.3, structure="UL-MM", remove_heads=4))
    assert [c["kv_heads"] for c in result.plan.kept_counts()] == [3, 3, 2]
    assert len({c["channels"] for c in result.plan.kept_counts()}) == 1


def _output_means(model, ids, names):
    """Mean output of o_proj/down_proj of every layer over all calibration tokens, and their inputs."""
    outs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in names:
            mod = layer.self_attn.o_proj if name == "o" else layer.mlp.down_proj
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=(i, name): outs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in outs.items()}


@pytest.mark.parametrize("compensation", ["bias", "lsq"])
def test_compensation_preserves_mean_output_on_dense_inputs(arch, compensation):
    ids = calibration()
    dense = tiny_model(arch)
    pruned = copy.deepcopy(dense)
    result = flap_llm.prune(pruned, ids, flap_llm.PruneConfig(ratio=0.5, compensation=compensation))
    inputs = _output_means(dense, ids, ("o", "d"))
    hd = dims_of(dense).head_dim
    for i, lp in enumerate(result.plan.layers):
        for name, kept in (("o", [h * hd + j for h in lp.heads for j in range(hd)]), ("d", list(lp.channels))):
            d_layer, p_layer = dense.model.layers[i], pruned.model.layers[i]
            d_mod = d_layer.self_attn.o_proj if name == "o" else d_layer.mlp.down_proj
            p_mod = p_layer.self_attn.o_proj if name == "o" else p_layer.mlp.down_proj
            x = inputs[(i, name)]
            with torch.no_grad():
                want = d_mod(x).double().mean(0)
                got = p_mod(x[:, kept]).double().mean(0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_without_compensation_mean_output_drifts():
    """The check above can fail: with no compensation the mean output moves."""
    ids = calibration()
    dense = tiny_model("llama-mha")
    pruned = copy.deepcopy(dense)
    result = flap_llm.prune(pruned, ids, flap_llm.PruneConfig(ratio=0.5, compensation="none"))
    x = _output_means(dense, ids, ("d",))[(0, "d")]
    kept = list(result.plan.layers[0].channels)
    with torch.no_grad():
        drift = (pruned.model.layers[0].mlp.down_proj(x[:, kept]).mean(0)
                 - dense.model.layers[0].mlp.down_proj(x).mean(0)).abs().max()
    assert drift > 1e-2


def test_same_inputs_same_plan(arch):
    ids = calibration()
    plans = [flap_llm.prune(tiny_model(arch), ids, flap_llm.PruneConfig(ratio=0.4)).plan for _ in range(2)]
    assert plans[0] == plans[1]
    assert plans[0].to_dict() == flap_llm.PrunePlan.from_dict(plans[0].to_dict()).to_dict()


def test_report_counts_parameters():
    model = tiny_model("llama-gqa")
    total_before = sum(p.numel() for p in model.parameters())
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.5))
    p = result.report["params"]
    assert p["model_before"] == total_before
    assert p["model_after"] == sum(q.numel() for q in model.parameters())
    assert p["decoder_before"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64)
    assert p["decoder_after"] == decoder_weight_params(model, spec_of(model))
    assert 0 < p["model_removed_fraction"] < p["decoder_removed_fraction"]
    assert set(result.report["timings_s"]) >= {"statistics", "plan", "apply", "total"}
    assert model.config.flap_layers[0]["num_attention_heads"] == result.plan.kept_counts()[0]["heads"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    """fp16/bf16 models prune; statistics stay float64 and the result tracks the fp32 plan's logits."""
    ids = calibration()
    model = tiny_model("qwen2", dtype=dtype)
    result = flap_llm.prune(model, ids, flap_llm.PruneConfig(ratio=0.3))
    assert result.stats[0].attn.sum.dtype == torch.float64
    assert model.model.layers[0].self_attn.o_proj.bias.dtype == dtype
    out = logits(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = tiny_model("qwen2")
    from flap_llm.methods.flap import bias_updates
    flap_llm.apply_plan(ref, result.plan, bias_updates(ref, spec_of(ref), dims_of(ref), result.plan, result.stats))
    err = (out.float() - logits(ref, ids)).abs().mean() / logits(ref, ids).abs().mean()
    assert err < 0.05


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "mag-sp"])
def test_align_rounds_kept_channels_by_score(method):
    ids = calibration()
    plain = flap_llm.prune(tiny_model("llama-gqa", layers=3), ids, flap_llm.PruneConfig(ratio=0.3, method=method))
    aligned = flap_llm.prune(tiny_model("llama-gqa", layers=3), ids,
                             flap_llm.PruneConfig(ratio=0.3, method=method, align=16))
    for i, (p, a) in enumerate(zip(plain.plan.layers, aligned.plan.layers)):
        assert len(a.channels) % 16 == 0
        assert abs(len(a.channels) - len(p.channels)) <= 8
        if method == "wanda-sp" and i > 0:
            continue  # sequential: later layers see the aligned earlier layers, so their scores differ
        small, big = sorted((set(p.channels), set(a.channels)), key=len)
        assert small <= big  # rounding only drops the lowest-scored or adds the next-best channels
        assert p.kv_heads == a.kv_heads


def test_align_channels_math():
    from flap_llm.math.select import align_channels
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 0.0])
    kept = torch.tensor([0, 2, 3])  # top-3 by score
    assert align_channels(kept, scores, 2).tolist() == [0, 2, 3, 4]  # 3 -> 4 (halves round up)
    assert align_channels(torch.tensor([0, 2, 3, 4, 1]), scores, 4).tolist() == [0, 2, 3, 4]  # 5 -> 4
    assert align_channels(kept, scores, 1).tolist() == [0, 2, 3]
    with pytest.raises(flap_llm.FlapError, match="align"):
        flap_llm.PruneConfig(align=0)


def test_reusing_statistics_gives_the_same_result():
    ids = calibration()
    first = flap_llm.prune(tiny_model("qwen2"), ids, flap_llm.PruneConfig(ratio=0.2))
    fresh, reused = tiny_model("qwen2"), tiny_model("qwen2")
    a = flap_llm.prune(fresh, ids, flap_llm.PruneConfig(ratio=0.5, metric="WIFN"))
    b = flap_llm.prune(reused, ids, flap_llm.PruneConfig(ratio=0.5, metric="WIFN"), statistics=first.stats)
    assert a.plan == b.plan and "statistics" not in b.report["timings_s"]
    torch.testing.assert_close(logits(fresh, ids), logits(reused, ids))
    with pytest.raises(flap_llm.FlapError, match="statistics do not match"):
        flap_llm.prune(tiny_model("qwen2", layers=3), ids, flap_llm.PruneConfig(), statistics=first.stats)


def test_statistics_merge_like_one_pass():
    """Statistics of two halves of the windows, merged, equal those of one pass over all windows."""
    model = tiny_model("llama-gqa")
    spec = spec_of(model)
    ids = calibration(n=9)
    whole = collect_statistics(model, spec, as_batches(ids, 4, VOCAB))
    first = collect_statistics(model, spec, as_batches(ids[:5], 2, VOCAB))
    second = collect_statistics(model, spec, as_batches(ids[5:], 3, VOCAB))
    for a, b, w in zip(first, second, whole):
        a.merge(b)
        assert a.attn.n == w.attn.n and a.mlp.n == w.mlp.n
        torch.testing.assert_close(a.mlp.var, w.mlp.var, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.attn.mean, w.attn.mean, rtol=1e-9, atol=1e-12)
