"""Greedy generation in vLLM, run with vLLM's own interpreter (.venv-vllm) by tests/test_vllm.py.

    python tests/vllm_generate.py JOBS.json OUT.json

JOBS: a list of {"path": model folder, "prompts": [[token ids], ...], "max_tokens": n}. OUT: per job, per prompt,
the generated token ids and each one's logprob; for a job with "refused": true, the error vLLM raised instead. One process serves every job in turn (the engine in-process), so
a model costs seconds, not vLLM's start-up.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def main(jobs_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        try:
            llm = LLM(job["path"], dtype="float32", max_model_len=job.get("max_model_len", 256), enforce_eager=True,
                      seed=0)
        except Exception as e:  # noqa: BLE001 - the test reads what was said
            if not job.get("refused"):
                raise
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=1, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
        results.append([{"tokens": list(o.outputs[0].token_ids),
                         "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                        for o in outputs])
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
