#!/usr/bin/env bash
# Install everything, then run the test suite: tiny models of every family, and one real-model test (marked slow)
# per capability. About 5 minutes of tests on 2 cores; `--long` adds the tests marked long (the method guards,
# the 30% heal, obs --offload, the sharded heal, vLLM on real models and depth in llama.cpp; about 45 minutes
# more). Tests marked vllm run when .venv-vllm exists (`bash scripts/install.sh --vllm`). Other arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not long")
if [[ "${1:-}" == "--long" ]]; then
    select=()
    shift
fi
bash scripts/install.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "${select[@]}" "$@"
