"""fisher.py: the output Fisher predicts the KL divergence a small output error costs, and is computed from the
right modules' gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, calibration, tiny_model
from flap_llm.model.arch import spec_of
from flap_llm.calibration.fisher import (output_fisher, sample_labels, weighting, window_selected,
                              window_uniforms)
from flap_llm.methods.obs import _covariances
from flap_llm.calibration.walk import output_projections


def _kl_per_token(model, ids, dense_logp, hook_module=None, noise=None) -> float:
    handle = None
    if hook_module is not None:
        handle = hook_module.register_forward_hook(lambda m, a, out: out + noise)
    try:
        with torch.no_grad():
            logp = model(ids).logits.double().log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    return float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean())


@pytest.mark.parametrize("arch, module", [("llama-gqa", "attn"), ("llama-gqa", "mlp"), ("gemma3", "attn")])
def test_fisher_predicts_the_kl_of_small_independent_errors(arch, module):
    """For errors independent across tokens, E[KL per token] = 1/2 sigma^2 tr(F) to second order."""
    model = tiny_model(arch).double()
    ids = calibration(n=48, length=16, seed=3)
    fisher = output_fisher(model, spec_of(model), list(ids.split(8)), seed=0)
    layer = 1
    proj = output_projections(model.model.layers[layer], spec_of(model))[module]
    f = fisher[layer][module]
    assert torch.allclose(f, f.T) and float(torch.linalg.eigvalsh(f).min()) > -1e-10
    with torch.no_grad():
        dense_logp = model(ids).logits.double().log_softmax(-1)
    sigma = 1e-2
    g = torch.Generator().manual_seed(0)
    measured = sum(_kl_per_token(model, ids, dense_logp, proj,
                                 sigma * torch.randn(*ids.shape, proj.out_features, generator=g, dtype=torch.float64))
                   for _ in range(8)) / 8
    predicted = 0.5 * sigma ** 2 * float(f.trace())
    assert 0.75 < measured / predicted < 1.33, (measured, predicted)


def test_fisher_is_the_mean_outer_product_of_sampled_label_gradients():
    """An independent computation (retain_grad on the projection outputs, labels drawn with the same generator)."""
    model = tiny_model("llama-mha").double()
    spec = spec_of(model)
    batches = list(calibration(n=6, length=12, seed=4).split(3))
    fisher = output_fisher(model, spec, batches, seed=7)
    outs, sums, n = {}, {}, 0
    hooks = [p.register_forward_hook(lambda m, a, out, key=(i, k): outs.__setitem__(key, out) or out.retain_grad())
             for i, layer in enumerate(model.model.layers) for k, p in output_projections(layer, spec).items()]
    for ids in batches:
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits.float().reshape(-1, VOCAB)
        y = sample_labels(logits.detach().softmax(-1), window_uniforms(ids, 7))
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        for key, out in outs.items():
            gr = out.grad.reshape(-1, out.shape[-1]).double()
            sums[key] = sums.get(key, 0) + gr.T @ gr
        n += logits.shape[0]
    for h in hooks:
        h.remove()
    for (i, k), s in sums.items():
        torch.testing.assert_close(fisher[i][k], s / n, rtol=1e-5, atol=1e-6 * float((s / n).abs().max()))


def test_weighting_is_a_square_root_with_a_ridge():
    a = torch.randn(6, 3, dtype=torch.float64)
    f = a @ a.T  # rank 3
    w = weighting(f, 0.0)
    torch.testing.assert_close(w @ w, f, rtol=1e-8, atol=1e-8)
    ridged = weighting(f, 0.5)
    torch.testing.assert_close(ridged @ ridged, f + 0.5 * f.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(ridged).min()) > 0


def test_sampled_labels_follow_the_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).repeat(40000, 1)
    y = sample_labels(probs, torch.rand(40000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(y, minlength=4).double() / y.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64), atol=0.01, rtol=0)


def test_fisher_leaves_no_parameter_gradients():
    model = tiny_model("llama-gqa")
    output_fisher(model, spec_of(model), list(calibration(n=4).split(2)))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_fisher_does_not_depend_on_batching():
    model = tiny_model("llama-gqa")
    ids = calibration(n=6, length=12, seed=4)
    a = output_fisher(model, spec_of(model), list(ids.split(2)))
    b = output_fisher(model, spec_of(model), list(ids.split(3)))
    for x, y in zip(a, b):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6 * float(x[k].abs().max()))


def test_a_fraction_of_the_windows_is_the_fisher_of_those_windows_alone():
    """fraction < 1: the Fisher of the drawn windows, the same as a full pass over them, whatever the batching;
    the covariances still see every window."""
    model = tiny_model("llama-gqa").double()
    spec = spec_of(model)
    ids = calibration(n=24, length=12, seed=5)
    picked = window_selected(ids, 3, 0.5)
    assert 6 <= int(picked.sum()) <= 18  # each window with probability 1/2
    assert torch.equal(picked[:10], window_selected(ids[:10], 3, 0.5))  # a window's draw is its own
    layers = model.model.layers
    covs = [_covariances(output_projections(layer, spec)) for layer in layers]
    part = output_fisher(model, spec, list(ids.split(5)), seed=3, inputs=covs, fraction=0.5)
    alone = output_fisher(model, spec, list(ids[picked].split(4)), seed=3)
    for x, y in zip(part, alone):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-6 * float(x[k].abs().max()))
    full = [_covariances(output_projections(layer, spec)) for layer in layers]
    output_fisher(model, spec, list(ids.split(6)), seed=3, inputs=full)
    for a, b in zip(covs, full):
        for k in a:
            assert a[k].n == b[k].n == ids.numel()
            torch.testing.assert_close(a[k].cov, b[k].cov, rtol=1e-4, atol=1e-6 * float(b[k].cov.abs().max()))  # float32 products


def test_when_no_window_is_drawn_every_window_counts():
    model = tiny_model("llama-gqa")
    ids = calibration(n=3, length=12, seed=4)
    assert not window_selected(ids, 0, 1e-9).any()
    few = output_fisher(model, spec_of(model), list(ids.split(2)), fraction=1e-9)
    full = output_fisher(model, spec_of(model), list(ids.split(2)))
    for x, y in zip(few, full):
        for k in x:
            assert torch.equal(x[k], y[k])


def test_the_windows_drawn_do_not_depend_on_the_process():
    """Python salts string hashes per process; the draw must not (a re-run must draw the same windows)."""
    import subprocess
    import sys
    code = ("import torch; from flap_llm.calibration.fisher import window_selected; "
            "ids = torch.arange(600).reshape(50, 12) % 97; print(window_selected(ids, 0, 0.5).int().tolist())")
    runs = {subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    picked = eval(runs.pop())
    assert 10 <= sum(picked) <= 40


@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "granite"])
def test_streamed_fisher_equals_the_whole_model_pass(arch, tmp_path):
    """One layer at a time (forward keeping each layer's input, the head's gradient, then back layer by layer
    with each forward recomputed) gives the whole-model pass's Fisher, with half the windows drawn, saved inputs
    spilled to files once past a byte budget, and no parameter gradients left."""
    from flap_llm.calibration.fisher import streamed_output_fisher
    from flap_llm.calibration.walk import InMemoryLayers
    model = tiny_model(arch, layers=3)
    spec, ids = spec_of(model), calibration(n=8, length=12, seed=5)
    batches = list(ids.split(3))
    want = output_fisher(model, spec, batches, fraction=0.5)
    layers = InMemoryLayers(model, spec)
    got = streamed_output_fisher(model, spec, batches, layers, fraction=0.5, scratch=tmp_path / "spill",
                                 memory=6 * 12 * 64 * 4)  # the first layer's inputs fit, the others spill
    assert not (tmp_path / "spill").exists()  # the spilled files are removed
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for x, y in zip(want, got):
        assert x.keys() == y.keys()
        for k in x:
            assert float(x[k].abs().max()) > 0
            torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-6 * float(x[k].abs().max()))


def test_streamed_fisher_spills_what_does_not_fit(tmp_path, monkeypatch):
    """Saved inputs past the budget go to files in the scratch folder, one per layer."""
    from flap_llm.calibration import fisher
    from flap_llm.calibration.walk import InMemoryLayers
    seen = []
    real_save = torch.save
    monkeypatch.setattr(fisher.torch, "save", lambda obj, path: (seen.append(path), real_save(obj, path))[1])
    model = tiny_model("llama-gqa", layers=3)
    spec, ids = spec_of(model), calibration(n=4, length=8)
    fisher.streamed_output_fisher(model, spec, [ids], InMemoryLayers(model, spec), scratch=tmp_path / "s", memory=0)
    assert [p.name for p in seen] == ["layer-0.pt", "layer-1.pt", "layer-2.pt"]
