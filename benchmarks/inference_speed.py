"""Real speedups of pruned models: dense vs FLAP at 20% and 50% (optionally with --align), measured
side by side in one run. Prefill tokens/s at 512 tokens (batch 1) and decode tokens/s with a KV cache at
batch 1 and 8, each compared with the ideal speedup given by the FLOP ratio.

  .venv/bin/python benchmarks/inference_speed.py --align 64 --repeat 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import MODELS, command_line, load, synchronize  # noqa: E402
from flap_llm.model.arch import decoder_weight_params, spec_of  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402


def flops_per_token(model, context: int) -> float:
    """Matmul FLOPs of one token: 2 x (decoder projection weights + lm_head) + attention over `context`."""
    spec = spec_of(model)
    attn = 0
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    for layer in flap_llm.model.arch.decoder_layers(model, spec):
        q = flap_llm.model.arch.attention_parts(layer, spec)[0]
        attn += 4 * (q.out_features // hd) * hd * context  # QK^T and AV
    return 2 * (decoder_weight_params(model, spec) + model.lm_head.weight.numel()) + attn


@torch.no_grad()
def prefill_tps(model, ids, device) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False)
    synchronize(device)
    return ids.numel() / (time.perf_counter() - t)


@torch.no_grad()
def decode_tps(model, prompt, new_tokens, device) -> float:
    """Tokens/s of the decode phase alone (generation time minus the prompt's prefill)."""
    mask = torch.ones_like(prompt)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, use_cache=True)
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    synchronize(device)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    synchronize(device)
    tn = time.perf_counter() - t
    return prompt.shape[0] * (new_tokens - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--align", type=int, default=None, help="also measure plans aligned to this multiple")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dense, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    variants = {"dense": dense}
    for r in map(float, args.ratios.split(",")):
        for align in ([None, args.align] if args.align else [None]):
            m = copy.deepcopy(dense)
            flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=r, align=align), batch_size=16)
            variants[f"flap {r:.0%}" + (f" align {align}" if align else "")] = m
    for m in variants.values():
        m.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), generator=g).to(args.device)
    prompts = {b: torch.randint(0, dense.config.vocab_size, (b, 32), generator=g).to(args.device) for b in (1, 8)}
    samples = {name: {"prefill": [], "decode_b1": [], "decode_b8": []} for name in variants}
    for m in variants.values():  # warm-up
        prefill_tps(m, long_ids, args.device)
        decode_tps(m, prompts[1], 4, args.device)
    for _ in range(args.repeat):  # interleaved, so machine noise hits every variant alike
        for name, m in variants.items():
            samples[name]["prefill"].append(prefill_tps(m, long_ids, args.device))
            samples[name]["decode_b1"].append(decode_tps(m, prompts[1], args.new_tokens, args.device))
            samples[name]["decode_b8"].append(decode_tps(m, prompts[8], args.new_tokens, args.device))
    rows = []
    base = {k: statistics.median(v) for k, v in samples["dense"].items()}
    for name, m in variants.items():
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        rows.append({
            "variant": name, "params": sum(p.numel() for p in m.parameters()),
            "tokens_per_s": med,
            "speedup": {k: med[k] / base[k] for k in med},
            "ideal_speedup_prefill": flops_per_token(dense, args.prefill // 2) / flops_per_token(m, args.prefill // 2),
            "ideal_speedup_decode": flops_per_token(dense, 32 + args.new_tokens // 2) / flops_per_token(m, 32 + args.new_tokens // 2),
            "kept_channels": [layer.mlp.down_proj.in_features for layer in m.model.layers],
        })
    print(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype, "rows": rows,
                      "versions": versions(), "command": command_line()}, indent=2))


if __name__ == "__main__":
    main()
