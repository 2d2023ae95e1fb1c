"""The pieces of benchmarks/layer_kl.py, on hand-made tensors and a tiny model."""

import math

import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def lk():
    return benchmark_module("layer_kl")


def test_predicted_kl_is_half_the_mean_fisher_norm(lk):
    e = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    f = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    # e1: 2; e2: 2 + 2*2*1 + 4*3 = 18; half the mean of 2 and 18
    assert lk.predicted_kl(e, f) == pytest.approx(5.0)


def test_mean_kl_of_known_distributions(lk):
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    want = (0.0 + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    assert lk.mean_kl(p.log(), q.log()) == pytest.approx(want)
    assert lk.mean_kl(q.log(), q.log()) == 0.0


def test_with_layers_changes_the_projection_for_the_measure_only(lk):
    lin = torch.nn.Linear(3, 2, bias=False)
    before = lin.weight.detach().clone()
    x = torch.ones(1, 3)
    new, b = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64)
    seen = lk._with_layers({0: lin}, {0: (new, b)}, lambda: lin(x).detach().clone())
    assert seen.tolist() == [[1.0, -2.0]]  # zero weights and the refit bias
    assert torch.equal(lin.weight, before) and torch.equal(lin(x), x @ before.T)  # restored, no hook left


def test_kept_units_reads_a_rows_plan(lk, tmp_path):
    import json
    layers = [{"heads": 4, "kv_heads": 2, "channels": c} for c in (10, 7)]
    rows = [{"model": "m", "ratio": 0.2, "name": "obs", "kept_per_layer": layers},  # draw 0 (no seed)
            {"model": "m", "seed": 1, "ratio": 0.2, "name": "obs",
             "kept_per_layer": [layers[0], {"heads": 2, "kv_heads": 1, "channels": 9}]}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lk.kept_units(path, "m", 0, 0.2, "obs") == [{"attn": 2, "mlp": 10}, {"attn": 2, "mlp": 7}]
    assert lk.kept_units(path, "m", 1, 0.2, "obs")[1] == {"attn": 1, "mlp": 9}
    with pytest.raises(SystemExit, match="no row"):
        lk.kept_units(path, "m", 2, 0.2, "obs")


def test_position_sums_separate_and_joint(lk):
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # one window of three positions
    e = torch.tensor([[[2.0, 0.0], [0.0, -1.0], [0.5, 0.5]]])  # dots 2, -1, 1
    per_token, joint = lk.position_sums(g, e, 2)
    assert per_token == pytest.approx(0.5 * (4 + 1 + 1) / 2)
    assert joint == pytest.approx(0.5 * (2 - 1 + 1) ** 2 / 2)


def test_sampled_gradients_are_the_sampled_losss_and_zero_at_the_last_position(lk):
    from conftest import calibration, tiny_model
    from flap_llm.model.arch import decoder_layers, spec_of
    from flap_llm.calibration.walk import output_projections
    model = tiny_model("llama-gqa")
    spec = spec_of(model)
    proj = output_projections(decoder_layers(model, spec)[1], spec)["mlp"]
    windows = calibration(4, 8)
    grads = lk.sampled_gradients(model, {"m": proj}, windows, seed=3, batch_size=3)["m"]
    assert grads.shape == (4, 8, proj.out_features)
    assert grads[:, -1].abs().max() == 0.0  # the last position predicts nothing scored
    # the same gradient by hand: the labels the draw gives, a plain backward of their summed -log p
    from flap_llm.calibration.fisher import sample_labels, window_uniforms
    b = windows[:2]
    outs = {}
    h = proj.register_forward_hook(lambda m, a, out: outs.__setitem__("o", out))
    logits = model(b, use_cache=False).logits[:, :-1]
    h.remove()
    flat = logits.reshape(-1, logits.shape[-1])
    y = sample_labels(flat.detach().softmax(-1), window_uniforms(b, 3)[:, :-1])
    loss = torch.nn.functional.cross_entropy(flat, y, reduction="sum")
    (want,) = torch.autograd.grad(loss, [outs["o"]])
    assert torch.allclose(grads[:2], want, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_token_weighted_kl_scales_each_tokens_error_by_its_relative_sensitivity(lk):
    e = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # the last position is not scored
    f = torch.eye(2)
    s = torch.tensor([[3.0, 1.0, 100.0]])  # relative weights 1.5 and 0.5 over the scored positions
    assert lk.token_weighted_kl(e, f, s) == pytest.approx(0.5 * (1.5 * 1 + 0.5 * 4) / 2)
    assert lk.token_weighted_kl(e, f, torch.ones(1, 3)) == pytest.approx(0.5 * (1 + 4) / 2)  # even: plain mean


def test_kl_against_the_models_own_log_probs_is_zero_whatever_the_batching(lk):
    from conftest import calibration, tiny_model
    model, windows = tiny_model("llama-gqa"), calibration(5, 8)
    dense = lk._log_probs(model, windows, 2)
    assert dense.shape[0] == 5 * 7
    assert lk._kl_against(model, windows, dense, 3) == pytest.approx(0.0, abs=1e-6)
