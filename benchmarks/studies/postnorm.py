"""Why obs is refused for Gemma 3 (docs/obs.md): a norm right after o_proj/down_proj breaks obs's
second-order error model.

  kl:     each layer's attention replaced by its calibration mean output (what removing its only KV group with
          the refit leaves), one layer at a time: the real KL from the dense model on held-out windows against
          obs's prediction 1/2 tr(F Cov(y)); then all layers but one at once (do the costs add up?).
  bisect: obs's parts switched to FLAP's one at a time at one ratio: wiki and books perplexity.

  .venv/bin/python benchmarks/studies/postnorm.py kl
  .venv/bin/python benchmarks/studies/postnorm.py bisect --nsamples 64 --ratio 0.5
Rows are appended to benchmarks/results/postnorm.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import flap_llm  # noqa: E402
import flap_llm.model.arch  # noqa: E402
import flap_llm.methods  # noqa: E402
from common import MODELS, append_jsonl, command_line, load  # noqa: E402
from flap_llm.model.arch import decoder_layers, spec_of  # noqa: E402
from flap_llm.calibration.data import bos_id, calibration_windows, load_texts, tokenize_corpus  # noqa: E402
from flap_llm.eval.evaluate import eval_windows, perplexity  # noqa: E402
from flap_llm.calibration.fisher import output_fisher  # noqa: E402
from flap_llm.calibration.walk import output_projections  # noqa: E402

# what is runnable today; the ablation rows in docs/obs.md (FLAP's order or FLAP's allocation inside obs) were
# measured with this script at commit e88b751, before those options were deleted (rows in
# benchmarks/results/postnorm.jsonl)
BISECT = [("FLAP (bias)", {}), ("FLAP + lsq", {"compensation": "lsq"}), ("obs", {"method": "obs"}),
          ("obs, measured allocation", {"method": "obs", "allocation": "measured"})]


@torch.no_grad()
def _log_probs(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(input_ids=b).logits.log_softmax(-1) for b in windows.split(batch)])


def attention_kl(args) -> None:
    model, tok, _ = load(args.model)
    spec = spec_of(model)
    layers = decoder_layers(model, spec)
    batches = list(calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0).split(args.batch_size))
    fisher = output_fisher(model, spec, batches)
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [output_projections(layer, spec)["attn"].register_forward_hook(
        lambda m, a, out, i=i: outputs.setdefault(i, []).append(out.detach().reshape(-1, out.shape[-1])))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    held_out = eval_windows(tokenize_corpus(load_texts("builtin:wiki", "eval"), tok), 128, bos_id(tok), args.eval_windows)
    dense = _log_probs(model, held_out, args.batch_size)

    def kl_without(idxs: list[int]) -> float:
        m = copy.deepcopy(model)
        for i in idxs:  # the output replaced by its calibration mean: W = 0, b = mean
            o = output_projections(decoder_layers(m, spec)[i], spec)["attn"]
            o.weight.data.zero_()
            o.bias = torch.nn.Parameter(torch.cat(outputs[i]).mean(0))
        lp = _log_probs(m, held_out, args.batch_size)
        return float((dense.exp() * (dense - lp)).sum(-1).mean())

    predicted, real = [], []
    for i in range(len(layers)):
        cov = torch.cov(torch.cat(outputs[i]).double().T, correction=0)
        predicted.append(0.5 * float((fisher[i]["attn"] * cov).sum()))
        real.append(kl_without([i]))
        print(f"layer {i}: predicted {predicted[-1]:.4f}, real {real[-1]:.4f}", flush=True)
    together = kl_without([i for i in range(len(layers)) if i != 1])
    append_jsonl(Path(args.results), {"kind": "kl", "model": args.model, "nsamples": args.nsamples,
                                      "eval_windows": args.eval_windows, "predicted": predicted, "real": real,
                                      "all_but_layer_1": together, "command": command_line()})


def bisect(args) -> None:
    model, tok, _ = load(args.model)
    obs = flap_llm.methods.get("obs")  # its refusal lifted for this study of why it is refused
    obs.refused = {k: v for k, v in obs.refused.items() if k != flap_llm.model.arch.architecture_of(model)}
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    for name, cfg in BISECT:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        result = flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=args.ratio, **cfg), batch_size=args.batch_size)
        prune_s = time.perf_counter() - t
        ppl = {spec: perplexity(m, tok, f"builtin:{spec}", 128, args.batch_size, args.eval_windows)["ppl"]
               for spec in ("wiki", "books")}
        row = {"kind": "bisect", "model": args.model, "name": name, "config": cfg, "ratio": args.ratio,
               "nsamples": args.nsamples, "eval_windows": args.eval_windows, **ppl, "prune_s": prune_s,
               "kv_groups": [len(lp.kv_heads) for lp in result.plan.layers],
               "channels": [len(lp.channels) for lp in result.plan.layers], "command": command_line()}
        append_jsonl(Path(args.results), row)
        print(f"{name}: wiki {ppl['wiki']:.2f}, books {ppl['books']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kl", "bisect"])
    ap.add_argument("--model", default="gemma3-270m", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--eval-windows", type=int, default=None, help="default: 16 (kl), 32 per text (bisect)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--results", default="benchmarks/results/postnorm.jsonl")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.eval_windows is None:
        args.eval_windows = 16 if args.what == "kl" else 32
    attention_kl(args) if args.what == "kl" else bisect(args)


if __name__ == "__main__":
    main()
