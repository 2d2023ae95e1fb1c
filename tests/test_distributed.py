"""torch.distributed: 2 CPU processes (gloo) give exactly the plan of one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flap_llm
from conftest import ARCHS, calibration, tiny_model

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import flap_llm
    from conftest import calibration, tiny_model
    dist.init_process_group("gloo")
    out = []
    for cfg, arch in {cases!r}:
        result = flap_llm.prune(tiny_model(arch, layers=3), calibration(n=13), flap_llm.PruneConfig(**cfg), batch_size=2)
        out.append({{"plan": result.plan.to_dict(), "stats": result.stats, "report": result.report}})
    if dist.get_rank() == 0:
        torch.save(out, {out_file!r})
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path: Path, cases: list[tuple[dict, str]]) -> list[dict]:
    """Rank 0's plan, statistics and report of each (config, family) case, pruned by 2 processes."""
    out = tmp_path / "rank0.pt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), cases=cases, out_file=str(out)))
    _spawn_two(script)
    return torch.load(out, weights_only=False)


def _spawn_two(script: Path) -> None:
    """Run `script` as ranks 0 and 1 of a gloo process group on this machine."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs


CASES = ([(cfg, "llama-gqa") for cfg in (dict(ratio=0.4), dict(ratio=0.4, method="wanda-sp"),
                                         dict(ratio=0.4, compensation="lsq"),
                                         dict(ratio=0.4, method="obs", sequential=True),
                                         dict(ratio=0.4, method="obs", allocation="measured"),
                                         dict(ratio=0.34, method="depth"))]
         + [(dict(ratio=0.4), arch) for arch in ARCHS if arch != "llama-gqa"])


def test_two_processes_same_plan_as_one(tmp_path):
    """Every method on a tiny Llama, and FLAP on every other family: one pair of gloo processes prunes them all
    (one spawn instead of one each), and each plan and its statistics are one process's."""
    for (cfg, arch), two in zip(CASES, _run_two(tmp_path, CASES)):
        _two_equals_one(two, cfg, arch)


def _two_equals_one(two, cfg, arch):
    one = flap_llm.prune(tiny_model(arch, layers=3), calibration(n=13), flap_llm.PruneConfig(**cfg),
                         batch_size=2)
    assert two["plan"] == one.plan.to_dict(), (cfg, arch)
    assert two["report"]["calibration"]["world_size"] == 2
    assert two["report"]["calibration"]["windows"] == 13
    # FLAP's sums are float64 throughout; obs reads its statistics off covariances of float32 products
    tol = 1e-12 if cfg.get("method", "flap") == "flap" else 1e-6
    if one.stats is not None:
        for a, b in zip(two["stats"], one.stats):
            assert a.attn.n == b.attn.n == 13 * 16
            torch.testing.assert_close(a.attn.sum, b.attn.sum, rtol=tol, atol=tol)
            torch.testing.assert_close(a.mlp.sumsq, b.mlp.sumsq, rtol=tol, atol=tol)


def test_torchrun_cli(tmp_path):
    """`torchrun --nproc-per-node 2 -m flap_llm prune ...`: rank 0 writes the same plan one process makes."""
    import json
    from conftest import tiny_checkpoint
    from flap_llm.cli import main
    model_dir = tiny_checkpoint(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    common = ["prune", "--model", str(model_dir), "--calib", str(text), "--nsamples", "10", "--seqlen", "16",
              "--no-eval", "--quiet", "--device", "cpu", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "flap_llm", *common, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "flap_manifest.json").read_text())
    one = json.loads((tmp_path / "one" / "flap_manifest.json").read_text())
    assert two["plan"] == one["plan"]
    assert two["report"]["calibration"]["world_size"] == 2


HEAL_WORKER = textwrap.dedent("""
    import copy, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import flap_llm
    from flap_llm.healing.distill import HealConfig, heal
    from conftest import calibration, tiny_model
    dist.init_process_group("gloo")
    teacher = tiny_model("llama-gqa", layers={layers})
    student = copy.deepcopy(teacher)
    {prune}
    result = heal(student, teacher, calibration(n=16, length=16, seed=5), HealConfig(**{cfg!r}))
    if dist.get_rank() == 0:
        torch.save({{"loss": result.loss, "tokens": result.tokens, "state": student.state_dict(),
                    "state_bytes": result.state_bytes}}, {out!r})
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("method,shard", [("full", False), ("lora", False), ("full", True), ("lora", True)])
def test_heal_on_two_processes_follows_the_loss_curve_of_one(tmp_path, method, shard):
    """Replicated (DDP) or sharded (FSDP2), two processes follow one process's loss curve and end with its
    weights; sharded, each rank holds about half of the trained weights, their gradients and the optimizer
    state."""
    import copy
    from flap_llm.healing.distill import HealConfig, heal
    pytest.importorskip("peft")
    cfg = dict(tokens=16 * 16 * 2, lr=3e-3, batch_size=4, grad_accum=2, method=method, shard=shard)
    two = _heal_two(tmp_path, cfg, FLAP_HALF)
    teacher = tiny_model("llama-gqa")
    student = copy.deepcopy(teacher)
    flap_llm.prune(student, calibration(), flap_llm.PruneConfig(ratio=0.5))
    one = heal(student, teacher, calibration(n=16, length=16, seed=5), HealConfig(**{**cfg, "shard": False}))
    assert two["tokens"] == one.tokens and len(two["loss"]) == len(one.loss) == 4
    share = two["state_bytes"] / one.state_bytes  # this rank's against the whole (DDP holds the whole)
    assert (0.45 < share < 0.6) if shard else share == 1, share
    assert two["loss"] == pytest.approx(one.loss, rel=1e-4)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-5)


FLAP_HALF = "flap_llm.prune(student, calibration(), flap_llm.PruneConfig(ratio=0.5))"
# A plan with a layer that keeps no head and one that keeps no MLP channel: their weights are empty tensors
EMPTY_LAYERS = {"layers": [{"heads": [0, 1], "kv_heads": [0], "channels": list(range(40))},
                           {"heads": [], "kv_heads": [], "channels": list(range(0, 96, 2))},
                           {"heads": [2, 3], "kv_heads": [1], "channels": []}]}


def _heal_two(tmp_path: Path, cfg: dict, prune: str, layers: int = 2) -> dict:
    """Rank 0's loss curve, healed weights and state bytes from a 2-process heal of a tiny Llama."""
    out = tmp_path / "rank0.pt"
    script = tmp_path / "heal_worker.py"
    script.write_text(HEAL_WORKER.format(tests=str(TESTS), cfg=cfg, out=str(out), prune=prune, layers=layers))
    _spawn_two(script)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("shard", [False, True])
def test_heal_of_a_plan_with_empty_layers_on_two_processes(tmp_path, shard):
    """A layer with no head left and one with no MLP channel (empty weight matrices, which FSDP2 cannot split)
    heal on two processes, sharded or replicated, along one process's loss curve to its weights."""
    import copy
    from flap_llm.healing.distill import HealConfig, heal
    cfg = dict(tokens=16 * 16 * 2, lr=3e-3, batch_size=4, grad_accum=2, shard=shard)
    two = _heal_two(tmp_path, cfg, f"flap_llm.apply_plan(student, {EMPTY_LAYERS!r})", layers=3)
    teacher = tiny_model("llama-gqa", layers=3)
    student = copy.deepcopy(teacher)
    flap_llm.apply_plan(student, EMPTY_LAYERS)
    assert student.model.layers[1].self_attn.o_proj.weight.shape == (64, 0)
    assert student.model.layers[2].mlp.down_proj.weight.shape == (64, 0)
    one = heal(student, teacher, calibration(n=16, length=16, seed=5), HealConfig(**{**cfg, "shard": False}))
    assert len(two["loss"]) == len(one.loss) == 4 and one.loss[-1] < one.loss[0]
    assert two["loss"] == pytest.approx(one.loss, rel=1e-4)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-5)


STOP_AFTER_CHECKPOINT = textwrap.dedent("""
    import sys
    import flap_llm.healing.distill as distill
    from flap_llm.cli import main
    save = distill._save_sharded_state
    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise distill.FlapError("stopped after a resume checkpoint")
    distill._save_sharded_state = save_then_stop
    sys.exit(main(sys.argv[1:]))
""")


def test_torchrun_heal_shard_resumes_and_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m flap_llm heal --shard`: stopped after its first resume checkpoint (a
    torch.distributed.checkpoint folder) and resumed, rank 0 writes the healed checkpoint one process makes
    without sharding; it reloads, and the resume state is removed."""
    import json

    from conftest import tiny_checkpoint
    from flap_llm.cli import main
    model_dir = tiny_checkpoint(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    assert main(["prune", "--model", str(model_dir), "--calib", str(text), "--nsamples", "8", "--seqlen", "16",
                 "--no-eval", "--quiet", "--ratio", "0.5", "--out", str(tmp_path / "pruned")]) == 0
    heal_args = ["heal", "--model", str(tmp_path / "pruned"), "--data", str(text), "--tokens", "256", "--seqlen", "16",
                 "--batch-size", "4", "--lr", "3e-3", "--no-eval", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # the interruption: each rank stops right after writing its shards of the first resume checkpoint
    stopper = tmp_path / "stop_after_checkpoint.py"
    stopper.write_text(STOP_AFTER_CHECKPOINT)

    def torchrun(*extra: str, stop_after_checkpoint: bool = False) -> subprocess.CompletedProcess:
        entry = [str(stopper)] if stop_after_checkpoint else ["-m", "flap_llm"]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(_free_port()), *entry, *heal_args, "--shard", *extra,
                               "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                              timeout=300)

    stopped = torchrun("--checkpoint-every", "2", stop_after_checkpoint=True)
    assert stopped.returncode != 0 and not (tmp_path / "two").exists()
    state = tmp_path / ".two.heal-state" / "heal-state.dcp"
    assert (state / "progress.pt").is_file() and len(list(state.glob("*.distcp"))) == 2  # one shard file per rank
    proc = torchrun("--checkpoint-every", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / ".two.heal-state").exists()
    assert main([*heal_args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "flap_manifest.json").read_text())["heal"]
    one = json.loads((tmp_path / "one" / "flap_manifest.json").read_text())["heal"]
    assert two["world_size"] == 2 and two["config"]["shard"] and len(one["loss"]) == 4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)  # steps 1-2 before the stop, 3-4 after
    healed, reference = flap_llm.load_pruned(tmp_path / "two"), flap_llm.load_pruned(tmp_path / "one")
    ids = calibration(n=2, length=16)
    with torch.no_grad():
        torch.testing.assert_close(healed(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
