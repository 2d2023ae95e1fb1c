"""Does obs's error model predict what pruning a layer costs the model's output? obs splits its budget over layers
by Fisher-weighted output errors: an error e of a module's output is taken to cost 1/2 e^T F e of KL divergence
from the dense model, added up over modules and layers. This measures both sides, one layer at a time.

For each layer, its o_proj and down_proj alone are pruned to the widths a result row's plan gave them (obs's
greedy at `select_damp` on the Fisher-weighted error, the refit at `lsq_damp`, on the dense inputs of the
calibration windows of that row's draw; every other layer dense), and on held-out windows (the evaluation
articles of builtin:wiki):
- predicted: per module 1/2 mean_t e_t^T F e_t, e_t its actual output error at token t (its inputs are the
  dense model's, since nothing before it changed), F obs's own Fisher of that output (the same windows and
  share), summed over the layer's two modules;
- actual: the mean over tokens of KL(dense next-token distribution || the pruned one's).
Also, from gradients of the dense model's loss at labels drawn from its own distributions on the same windows,
the same errors' second-order cost with each token's own Fisher, and counting how the errors at different positions
of a window add up in the later predictions they share (`position_sums`): which part of the model the
prediction misses. Last, every listed layer pruned at once (non-sequential: each refit on dense inputs): the KL
against the sum of the layers' own (do the costs add up?). One JSONL row per run; `--render` prints the tables.

  .venv/bin/python benchmarks/studies/layer_kl.py --model qwen0.5b --seed 1 --ratio 0.2
  .venv/bin/python benchmarks/studies/layer_kl.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
from flap_llm.model.apply import complement  # noqa: E402
from flap_llm.model.arch import decoder_layers, dims_of, spec_of  # noqa: E402
from flap_llm.math.compensate import lsq_compensation  # noqa: E402
from flap_llm.config import PruneConfig  # noqa: E402
from flap_llm.methods.obs import FISHER_FRACTION, SELECT_DAMP  # noqa: E402
from flap_llm.calibration.data import bos_id, calibration_windows, load_texts, tokenize_corpus  # noqa: E402
from flap_llm.eval.evaluate import eval_windows  # noqa: E402
from flap_llm.calibration.fisher import _logit_gradient, output_fisher, weighting, window_uniforms  # noqa: E402
from flap_llm.methods.obs import FISHER_RIDGE, STEPS  # noqa: E402
from flap_llm.math.reconstruct import damped, removal_path  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.math.stats import Covariance  # noqa: E402
from flap_llm.calibration.walk import output_projections, record_inputs  # noqa: E402


def predicted_kl(errors: torch.Tensor, fisher: torch.Tensor) -> float:
    """1/2 mean_t e_t^T F e_t over the rows of `errors` [T, d]."""
    e = errors.to(torch.float64)
    return 0.5 * float(((e @ fisher.to(torch.float64)) * e).sum(1).mean())


def position_sums(grads: torch.Tensor, errors: torch.Tensor, positions: int) -> tuple[float, float]:
    """Second-order KL per predicted position from label-sampled gradients g [W, L, d] (of the summed -log p(y),
    y drawn from the dense model) and output errors e [W, L, d]: ignoring, and counting, how the errors at
    different positions of a window add up in the later predictions they share. The first is
    1/2 mean_w sum_t (g_t^T e_t)^2 (a per-token Fisher), the second 1/2 mean_w (sum_t g_t^T e_t)^2; each
    divided by the predicted positions per window."""
    dots = (grads.to(torch.float64) * errors.to(torch.float64)).sum(-1)  # [W, L]
    return (0.5 * float((dots ** 2).sum(1).mean()) / positions, 0.5 * float((dots.sum(1) ** 2).mean()) / positions)


def token_weighted_kl(errors: torch.Tensor, fisher: torch.Tensor, sensitivity: torch.Tensor) -> float:
    """1/2 mean_t w_t e_t^T F e_t over a window's predicted positions (errors [W, L, d], the last position
    predicts nothing scored), with w_t = s_t / mean(s) for the tokens' sensitivities s [W, L] (e.g. the mean of
    |g_t|^2 over label draws): the averaged Fisher F, each token's error scaled by how much its token matters."""
    e = errors[:, :-1].to(torch.float64)
    w = sensitivity[:, :-1].to(torch.float64)
    w = w / w.mean()
    return 0.5 * float((w * ((e @ fisher.to(torch.float64)) * e).sum(-1)).mean())


def sampled_gradients(model, projs: dict, windows: torch.Tensor, seed: int, batch_size: int) -> dict:
    """For each projection, d(sum of -log p(y)) / d(its output) [W, L, d] (float32), y drawn from the model's own
    next-token distributions (the draws `seed` gives each window), through the dense model."""
    grads = {key: [] for key in projs}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for b in windows.split(batch_size):
            outs = {}
            hooks = [proj.register_forward_hook(lambda m, a, out, key=key: outs.__setitem__(key, out))
                     for key, proj in projs.items()]
            try:
                with torch.enable_grad():
                    emb = model.get_input_embeddings()(b).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1]
                    flat = logits.reshape(-1, logits.shape[-1])
                    u = window_uniforms(b, seed)[:, :-1]
                    keys = list(outs)
                    got = torch.autograd.grad(flat, [outs[k] for k in keys],
                                              _logit_gradient(flat, u).to(flat.dtype))
            finally:
                for h in hooks:
                    h.remove()
            for k, g in zip(keys, got):
                grads[k].append(g.detach().float())
    finally:
        for p in params:
            p.requires_grad_(True)
    return {k: torch.cat(v) for k, v in grads.items()}


def mean_kl(logp_dense: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over rows of KL(p_dense || p) from log-probabilities [T, V]."""
    return float((logp_dense.exp() * (logp_dense - logp)).sum(-1).mean())


def kept_units(results: Path, model: str, seed: int, ratio: float, name: str) -> list[dict[str, int]]:
    """Each layer's kept KV groups and MLP channels, {"attn": ..., "mlp": ...}, in a result row of
    benchmarks/obs.py (the draw `seed`)."""
    for r in read_jsonl(results):
        if (r["model"], r.get("seed", 0), r["ratio"], r["name"]) == (model, seed, ratio, name):
            return [{"attn": layer["kv_heads"], "mlp": layer["channels"]} for layer in r["kept_per_layer"]]
    raise SystemExit(f"no row {name!r} of {model} at {ratio} from draw {seed} in {results}")


@torch.no_grad()
def _next_token_log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """log p of every position's next token but the last, [B * (L - 1), V] float32."""
    return model(batch, use_cache=False).logits[:, :-1].float().log_softmax(-1).flatten(0, 1)


def _log_probs(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([_next_token_log_probs(model, b) for b in windows.split(batch_size)])


def _kl_against(model, windows: torch.Tensor, dense: torch.Tensor, batch_size: int) -> float:
    """KL from the dense log-probabilities, batch by batch (never all of the pruned ones at once)."""
    total, start = 0.0, 0
    for b in windows.split(batch_size):
        logp = _next_token_log_probs(model, b)
        total += mean_kl(dense[start:start + logp.shape[0]], logp) * logp.shape[0]
        start += logp.shape[0]
    return total / start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    ap.add_argument("--seed", type=int, default=1, help="the calibration draw (and of the row whose widths are used)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--row", default="obs select 0.01", help="the benchmarks/obs.py row whose widths are used")
    ap.add_argument("--rows-from", default="benchmarks/results/obs_seeds.jsonl")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: every layer)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--label-draws", type=int, default=4, help="label draws per held-out window for the "
                    "position-resolved second-order estimates")
    ap.add_argument("--results", default="benchmarks/results/layer_kl.jsonl")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.results)))
        return
    t0 = time.perf_counter()
    cfg = PruneConfig(ratio=args.ratio, method="obs")
    kept = kept_units(Path(args.rows_from), args.model, args.seed, args.ratio, args.row)
    model, tok, _ = load(args.model)
    spec, dims = spec_of(model), dims_of(model)
    layers = decoder_layers(model, spec)
    which = [int(i) for i in args.layers.split(",")] if args.layers else list(range(dims.n_layers))
    batches = list(calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, args.seed).split(args.batch_size))
    # (layer, module) -> (its output projection, its unit's columns, its units, how many the plan removed)
    units = {"attn": (dims.group_size * dims.head_dim, dims.n_kv_heads), "mlp": (1, dims.d_ff)}
    mods = {(i, k): (proj, units[k][0], units[k][1] - kept[i][k])
            for i in which for k, proj in output_projections(layers[i], spec).items() if kept[i][k] < units[k][1]}
    covs = {key: Covariance(proj.in_features, torch.float32) for key, (proj, _, _) in mods.items()}
    fisher = output_fisher(model, spec, batches, fraction=FISHER_FRACTION, progress=True)  # obs's own sample
    projs = {key: proj for key, (proj, _, _) in mods.items()}
    with torch.no_grad(), record_inputs(projs, covs):
        for b in tqdm(batches, desc="covariances", unit="batch"):
            model(b, use_cache=False)
    ids = tokenize_corpus(load_texts("builtin:wiki", "eval"), tok)
    held = eval_windows(ids, args.seqlen, bos_id(tok), args.eval_windows)
    seen: dict[tuple, list[torch.Tensor]] = {key: [] for key in mods}  # each projection's held-out inputs
    hooks = [proj.register_forward_pre_hook(lambda m, a, key=key: seen[key].append(a[0].flatten(0, 1).float()))
             for key, proj in projs.items()]
    dense = _log_probs(model, held, args.batch_size)
    for h in hooks:
        h.remove()
    per_layer, updates, errors = [], {}, {}
    for i in tqdm(which, desc="layers", unit="layer"):
        mine, pred = {}, {}
        for k in ("attn", "mlp"):
            if (i, k) not in mods:
                continue
            lin, size, n_removed = mods[(i, k)]
            cov, w = covs[(i, k)], lin.weight.detach().to(torch.float64)
            path = removal_path(weighting(fisher[i][k], FISHER_RIDGE) @ w, damped(cov.cov, SELECT_DAMP), size,
                                n_removed, 1 if k == "attn" else max(1, dims.d_ff // STEPS), dtype=torch.float32)
            gone = (path.order[:, None] * size + torch.arange(size)).flatten()
            keep = complement(gone, lin.in_features)
            w_k, b = lsq_compensation(lin.weight, lin.bias, cov.mean, cov.cov, keep, gone, cfg.options.lsq_damp)
            new = torch.zeros_like(w)
            new[:, keep] = w_k
            err = torch.cat(seen[(i, k)]).to(torch.float64) @ (new - w).T + (b - _bias(lin))
            pred[k] = predicted_kl(err, fisher[i][k])
            errors[(i, k)] = err.float().reshape(held.shape[0], held.shape[1], -1)
            mine[(i, k)] = updates[(i, k)] = (new, b)
        actual = _with_layers(projs, mine, lambda: _kl_against(model, held, dense, args.batch_size)) if mine else 0.0
        per_layer.append({"layer": i, "kept": kept[i], "predicted_kl": pred, "kl": actual})
        print(f"layer {i}: kept {kept[i]}, predicted {sum(pred.values()):.5f}, KL {actual:.5f}", flush=True)
    together = _with_layers(projs, updates, lambda: _kl_against(model, held, dense, args.batch_size))
    # the same errors' second-order cost from label-sampled gradients, per position and counting the positions'
    # shared predictions, averaged over the label draws
    sums = {key: [0.0, 0.0] for key in errors}
    sensitivity = {key: torch.zeros(held.shape, dtype=torch.float64) for key in errors}  # mean |g_t|^2 per token
    for draw in tqdm(range(args.label_draws), desc="label draws", unit="draw"):
        grads = sampled_gradients(model, {key: projs[key] for key in errors}, held, draw, max(1, args.batch_size // 4))
        for key, e in errors.items():
            for j, v in enumerate(position_sums(grads[key], e, held.shape[1] - 1)):
                sums[key][j] += v / args.label_draws
            sensitivity[key] += grads[key].to(torch.float64).pow(2).sum(-1) / args.label_draws
    for x in per_layer:
        mine = [key for key in sums if key[0] == x["layer"]]
        x["per_token_kl"] = sum(sums[key][0] for key in mine)
        x["positions_kl"] = sum(sums[key][1] for key in mine)
        x["token_weighted_kl"] = sum(token_weighted_kl(errors[key], fisher[key[0]][key[1]], sensitivity[key])
                                     for key in mine)
    append_jsonl(Path(args.results), {
        "model": args.model, "seed": args.seed, "ratio": args.ratio, "row": args.row, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "eval_windows": args.eval_windows, "select_damp": SELECT_DAMP,
        "lsq_damp": cfg.options.lsq_damp, "label_draws": args.label_draws, "per_layer": per_layer, "together_kl": together,
        "seconds": time.perf_counter() - t0, "versions": versions(), "command": command_line()})


def _bias(lin: torch.nn.Linear) -> torch.Tensor | float:
    return lin.bias.detach().double() if lin.bias is not None else 0.0


def _with_layers(projs: dict, updates: dict, measure):
    """`measure()` with the listed projections' weights replaced (and their outputs shifted by the refit bias),
    then the dense weights back."""
    saved, hooks = {}, []
    for key, (new, b) in updates.items():
        lin = projs[key]
        saved[key] = lin.weight.data.clone()
        lin.weight.data.copy_(new.to(lin.weight.dtype))
        shift = (b - _bias(lin)).to(lin.weight.dtype)
        hooks.append(lin.register_forward_hook(lambda m, a, out, shift=shift: out + shift))
    try:
        return measure()
    finally:
        for h in hooks:
            h.remove()
        for key, w in saved.items():
            projs[key].weight.data.copy_(w)


def render(results: Path) -> str:
    out = []
    for r in read_jsonl(results):
        rows = r["per_layer"]
        sampled = all("positions_kl" in x for x in rows)  # rows measured before the sampled estimates lack them
        weighted = all("token_weighted_kl" in x for x in rows)
        more = ((" | tokens weighted by ‖g‖²" if weighted else "") + " | per-token Fisher | counting shared positions | "
                "KL / that") if sampled else ""
        out += [f"{r['model']}, {r['row']} at {r['ratio']:.0%}, calibration draw {r['seed']}: each layer alone at the "
                f"row's widths ({r['eval_windows']} held-out windows"
                + (f", {r['label_draws']} label draws each" if sampled else "") + ")\n",
                f"| layer | KV groups / MLP channels kept | predicted KL (½ eᵀFe): attn + mlp{more} | KL | KL / predicted |",
                "|---:|---:|---:|" + ("---:|" if weighted else "") + ("---:|---:|---:|" if sampled else "") + "---:|---:|"]

        def ratio(a, b):
            return f"{a / b:.2f}" if b > 0 else "–"
        for x in rows:
            pred = sum(x["predicted_kl"].values())
            parts = " + ".join(f"{x['predicted_kl'][k]:.5f}" if k in x["predicted_kl"] else "0" for k in ("attn", "mlp"))
            extra = ((f" | {x['token_weighted_kl']:.5f}" if weighted else "")
                     + f" | {x['per_token_kl']:.5f} | {x['positions_kl']:.5f} | {ratio(x['kl'], x['positions_kl'])}"
                     if sampled else "")
            out.append(f"| {x['layer']} | {x['kept']['attn']} / {x['kept']['mlp']} | {parts}{extra} | {x['kl']:.5f} | "
                       f"{ratio(x['kl'], pred)} |")
        s_pred, s_kl = (sum(sum(x["predicted_kl"].values()) for x in rows), sum(x["kl"] for x in rows))
        extra = ""
        if sampled:
            s_tok, s_pos = sum(x["per_token_kl"] for x in rows), sum(x["positions_kl"] for x in rows)
            extra = ((f" | {sum(x['token_weighted_kl'] for x in rows):.5f}" if weighted else "")
                     + f" | {s_tok:.5f} | {s_pos:.5f} | {ratio(s_kl, s_pos)}")
        blank = (" | | |" + (" |" if weighted else "")) if sampled else ""
        out.append(f"| every layer listed, each alone, summed | | {s_pred:.5f}{extra} | {s_kl:.5f} | {ratio(s_kl, s_pred)} |")
        out.append(f"| every layer listed at once | |{blank} | {r['together_kl']:.5f} | {ratio(r['together_kl'], s_pred)} |")
        out.append("\n" + commands_of([r]) + f"  \nVersions: `{json.dumps(r['versions'])}`\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
