"""vLLM's side of benchmarks/vllm_speed.py, run with vLLM's interpreter (.venv-vllm/bin/python).

    python benchmarks/vllm_timing.py JOBS.json OUT.json

JOBS: {"models": {label: folder}, "rounds": R, "batch": B, "prompt_len": P, "new_tokens": N, "ttft_len": T,
"prompt_ids": [ids...], "dtype": "float32"}. Every round loads each model in turn (the engine in-process) and
measures:
- throughput: B prompts of P tokens, N new tokens each (EOS ignored), generated tokens per second of wall time;
- time to first token: one prompt of T tokens with one new token, the median of 3 requests.
OUT: {"device": where vLLM ran, "rounds": {label: [per-round {"tokens_per_s", "ttft_s"}]}}. On a machine with a
GPU, vLLM runs there (its CUDA build); VLLM_CPU_KVCACHE_SPACE only sizes the CPU build's cache.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time


def measure(llm, job: dict) -> dict:
    from vllm import SamplingParams
    ids = job["prompt_ids"]
    p, n, b = job["prompt_len"], job["new_tokens"], job["batch"]
    prompts = [{"prompt_token_ids": ids[i * p:(i + 1) * p]} for i in range(b)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    first = []
    for k in range(3):  # a different prompt each time, so no prefix cache serves it
        prompt = {"prompt_token_ids": ids[(k + 1) * 7:(k + 1) * 7 + job["ttft_len"]]}
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        first.append(time.perf_counter() - t)
    return {"tokens_per_s": generated / wall, "ttft_s": statistics.median(first), "generated": generated}


def main(jobs_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import LLM

    # on a GPU each model takes a quarter of its memory, so that a model not yet released can't starve the next
    on_gpu = {"gpu_memory_utilization": 0.25} if torch.cuda.is_available() else {}
    with open(jobs_path) as f:
        job = json.load(f)
    results: dict[str, list] = {label: [] for label in job["models"]}
    for r in range(job["rounds"]):
        for label, folder in job["models"].items():
            llm = LLM(folder, dtype=job["dtype"], max_model_len=job["max_model_len"], enforce_eager=True, seed=0,
                      enable_prefix_caching=False, **on_gpu)
            row = measure(llm, job)
            results[label].append(row)
            print(f"round {r + 1} {label}: {row}", flush=True)
            del llm
            gc.collect()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(out_path, "w") as f:
        json.dump({"device": device, "rounds": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
