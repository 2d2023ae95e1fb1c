"""Models larger than memory: prune a random-weight LLaMA with Llama-2-7B's shapes (bf16 safetensors,
about 13.5 GB on disk) at 20% with --offload-style layer streaming, and record wall time and peak RSS.

  .venv/bin/python benchmarks/offload_7b.py --workdir /tmp/flap-7b

The model is generated once into WORKDIR/src (layer by layer, so generating needs little memory either);
pruning runs in a fresh process whose peak RSS (ru_maxrss) is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def make_model(folder: Path, layers: int) -> None:
    """Write random bf16 weights shard by shard (one decoder layer per shard)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    h, f = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}
    def layer(i: int) -> dict[str, torch.Tensor]:
        out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        return out

    n = layers + 1
    weight_map = {}
    for i in range(n):  # one shard in memory at a time
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < layers:
            tensors = layer(i)
        else:
            tensors = {"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, h, generator=g) * 0.02).bfloat16(),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                       "lm_head.weight": (torch.randn(cfg.vocab_size, h, generator=g) * 0.02).bfloat16()}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)


def run(src: Path, out: Path, nsamples: int, seqlen: int, ratio: float) -> None:
    """The measured part, in its own process."""
    import flap_llm
    from flap_llm.offload import prune_offloaded

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (nsamples, seqlen), generator=g)
    t = time.perf_counter()
    result = prune_offloaded(src, ids, flap_llm.PruneConfig(ratio=ratio), out, batch_size=8, progress=True,
                             overwrite=True)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "timings_s": result.report["timings_s"], "params": result.report["params"],
                      "kv_groups_kept": result.report["layers"]["kv_groups_kept"],
                      "peak_layer_bytes": result.report["offload"]["peak_layer_bytes"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/flap-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    src, out = work / "src", work / "out"
    if args.run:
        run(src, out, args.nsamples, args.seqlen, args.ratio)
        return
    t = time.perf_counter()
    make_model(src, args.layers)
    make_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, __file__, "--run", "--workdir", str(work), "--nsamples", str(args.nsamples),
                           "--seqlen", str(args.seqlen), "--ratio", str(args.ratio)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    from flap_llm.report import versions
    print(json.dumps({**res, "source_bytes": size, "output_bytes": out_size, "make_s": make_s,
                      "nsamples": args.nsamples, "seqlen": args.seqlen, "ratio": args.ratio, "layers": args.layers,
                      "versions": versions(), "command": shlex.join(["python", *sys.argv])}, indent=2))


if __name__ == "__main__":
    main()
