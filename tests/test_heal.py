"""Healing by distillation on tiny models: the loss and the KL to the teacher go down, LoRA merges exactly,
healed checkpoints reload exactly, resume continues the same curve, bad pairs are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import flap_llm
from flap_llm import FlapError
from flap_llm.healing.distill import HealConfig, distill_loss, heal, teacher_copy, teacher_dtype
from conftest import VOCAB, calibration, tiny_model

pytest.importorskip("peft")


def _pair(arch="llama-gqa", ratio=0.5, seed=0):
    teacher = tiny_model(arch, seed=seed)
    student = copy.deepcopy(teacher)
    flap_llm.prune(student, calibration(), flap_llm.PruneConfig(ratio=ratio))
    return student, teacher


@torch.no_grad()
def _kl(student, teacher, ids) -> float:
    _, kl = distill_loss(student(ids).logits, teacher(ids).logits, ids, 1.0, 1.0)
    return float(kl)


def test_distill_loss_is_the_kl_and_mixes_the_lm_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ps, pt = s.softmax(-1), t.softmax(-1)
    want = (pt * (pt.log() - ps.log())).sum(-1).mean()
    loss, kl = distill_loss(s, t, ids, 1.0, 1.0)
    assert float(loss) == pytest.approx(float(want), rel=1e-5) and float(kl) == pytest.approx(float(want), rel=1e-5)
    assert float(distill_loss(t, t, ids, 2.0, 1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    lm = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert float(distill_loss(s, t, ids, 1.0, 0.25)[0]) == pytest.approx(float(0.25 * want + 0.75 * lm), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "gemma3", "phi3"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_heal_lowers_loss_and_kl_to_the_teacher(arch, method):
    student, teacher = _pair(arch)
    data = calibration(n=32, length=16, seed=5)
    held_out = calibration(n=8, length=16, seed=9)
    before, before_train = _kl(student, teacher, held_out), _kl(student, teacher, data)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    cfg = HealConfig(tokens=32 * 16 * 10, lr=3e-3 if method == "full" else 1e-2, method=method, batch_size=8)
    result = heal(student, teacher, data, cfg)
    assert result.steps == 40 and len(result.loss) == 40 and result.tokens == 32 * 16 * 10
    assert sum(result.loss[-4:]) < 0.9 * sum(result.loss[:4])
    # on the training windows and on windows it never saw (random tokens: the hardest case to generalize to)
    assert _kl(student, teacher, data) < 0.8 * before_train
    assert _kl(student, teacher, held_out) < 0.9 * before
    assert {n: p.shape for n, p in student.named_parameters()} == shapes  # same pruned model, no adapters left
    if method == "lora":
        assert result.merge_error is not None and result.merge_error < 1e-4


def test_a_bf16_teacher_on_a_gpu_teaches_like_the_full_precision_one():
    """On a GPU the command line holds the teacher in bf16 (its forward runs under bf16 autocast there); the
    copy takes no second full-width model, keeps tied weights tied, and is accepted as the student's teacher."""
    assert teacher_dtype("cuda:1", torch.float32) == torch.bfloat16 and teacher_dtype("cuda", "auto") == torch.bfloat16
    assert teacher_dtype("cpu", "auto") == "auto" and teacher_dtype(torch.device("cpu"), torch.float32) == torch.float32
    student, teacher = _pair("gemma3")  # tied embeddings
    half = teacher_copy(teacher, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.lm_head.weight is half.model.embed_tokens.weight
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(teacher.parameters(), half.parameters()))
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the dense model is left as it was
    ids = calibration(n=4, length=16, seed=9)
    gap = _kl(student, teacher, ids)
    assert abs(_kl(student, half, ids) - gap) < 0.01 * gap  # the rounding moves the KL to the student by < 1%
    result = heal(student, half, calibration(n=16, length=16, seed=5), HealConfig(tokens=16 * 16 * 4, lr=3e-3))
    assert result.steps == 8 and _kl(student, teacher, ids) < gap


def test_healed_checkpoint_reloads_exactly(tmp_path):
    student, teacher = _pair()
    heal(student, teacher, calibration(n=16, length=16, seed=5), HealConfig(tokens=16 * 16 * 2, lr=1e-3))
    flap_llm.save_pruned(student, tmp_path / "h")
    ids = calibration(n=3, length=10, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(flap_llm.load_pruned(tmp_path / "h")(ids).logits, student(ids).logits,
                                   rtol=0, atol=0)


def test_resume_continues_the_same_loss_curve(tmp_path, monkeypatch):
    from flap_llm.healing import distill as heal_mod
    data = calibration(n=16, length=16, seed=5)
    cfg = HealConfig(tokens=16 * 16 * 3, lr=1e-3, batch_size=4, grad_accum=2, checkpoint_every=3, warmup=0.2)
    student, teacher = _pair()
    straight = heal(student, teacher, data, cfg, checkpoint_dir=tmp_path / "a")
    assert straight.steps == 6

    saved = heal_mod._save_state

    def save_then_crash(path, state):
        saved(path, state)
        raise KeyboardInterrupt

    student2, teacher2 = _pair()
    monkeypatch.setattr(heal_mod, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        heal(student2, teacher2, data, cfg, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(heal_mod, "_save_state", saved)
    student3, _ = _pair()  # a fresh process: the pruned student as it was saved before healing
    resumed = heal(student3, teacher2, data, cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.steps == 3
    assert resumed.loss == pytest.approx(straight.loss, rel=1e-5)
    ids = calibration(n=2, length=8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(student3(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(FlapError, match="another heal configuration"):
        heal(_pair()[0], teacher2, data, HealConfig(**{**cfg.__dict__, "lr": 2e-3}), checkpoint_dir=tmp_path / "b",
             resume=True)


def test_bad_pairs_and_data_are_refused_before_training():
    student, teacher = _pair()
    data = calibration(n=4, length=16)
    other = tiny_model("llama-gqa", seed=7)  # same shapes, other weights
    with pytest.raises(FlapError, match="not pruned from this model"):
        heal(student, other, data)
    with pytest.raises(FlapError, match="teacher is a"):
        heal(student, tiny_model("qwen2"), data)
    with pytest.raises(FlapError, match="not pruned"):
        heal(copy.deepcopy(teacher), teacher, data)
    bigger = tiny_model("llama-gqa")
    bigger.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(FlapError, match="vocabulary"):
        heal(student, bigger, data)
    with pytest.raises(FlapError, match=r"shape \[N, L\]"):
        heal(student, teacher, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(FlapError, match="token ids"):
        heal(student, teacher, torch.rand(4, 16))
    with pytest.raises(FlapError, match="heal method"):
        HealConfig(method="qlora")
    with pytest.raises(FlapError, match="nothing to resume"):
        heal(student, teacher, data, resume=True)


def test_cli_heal_and_prune_heal_tokens(tmp_path, model_dir, text_file):
    import json
    from flap_llm.cli import main
    from flap_llm.model.checkpoint import MANIFEST
    pruned = tmp_path / "pruned"
    common = ["--quiet", "--device", "cpu", "--batch-size", "4", "--eval-limit", "4", "--eval", str(text_file)]
    assert main(["prune", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "16",
                 "--ratio", "0.5", "--out", str(pruned), *common]) == 0
    healed = tmp_path / "healed"
    before = {p.name: p.read_bytes() for p in pruned.iterdir() if p.is_file()}
    assert main(["heal", "--model", str(pruned), "--data", str(text_file), "--tokens", "256", "--seqlen", "16",
                 "--lr", "1e-3", "--out", str(healed), *common]) == 0
    assert {p.name: p.read_bytes() for p in pruned.iterdir() if p.is_file()} == before  # the input is untouched
    manifest = json.loads((healed / MANIFEST).read_text())
    heal_report = json.loads((healed / "heal_report.json").read_text())
    assert manifest["heal"]["steps"] == 4 and manifest["plan"] == json.loads((pruned / MANIFEST).read_text())["plan"]
    assert heal_report["teacher"] == str(model_dir) and heal_report["data"]["train"].endswith("(calibration split)")
    ppl = heal_report["perplexity"]
    assert ppl["before"] > 1 and ppl["after"] > 1  # a random tiny teacher: its text perplexity is no target
    a, b = flap_llm.load_pruned(pruned), flap_llm.load_pruned(healed)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    # the healed folder's model card gives the prune's numbers and the healing's
    from huggingface_hub import ModelCard
    card = ModelCard.load(healed / "README.md")
    assert "pruned" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert f"| perplexity after healing ({text_file}) |  | {ppl['after']:.2f} |" in card.text
    assert "then healed by distillation" in card.text
    # closer to the teacher on the text it was healed on
    from transformers import AutoModelForCausalLM, AutoTokenizer
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text_file.read_text(), return_tensors="pt").input_ids[:, :256]
    ids = ids.reshape(-1, 16)
    assert _kl(b, teacher, ids) < 0.9 * _kl(a, teacher, ids)
    # the one-command path: prune, then heal with the dense model in memory as the teacher
    both = tmp_path / "both"
    assert main(["prune", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "16",
                 "--ratio", "0.5", "--heal-tokens", "256", "--out", str(both), *common]) == 0
    report = json.loads((both / "report.json").read_text())
    assert report["heal"]["steps"] == 4 and report["heal"]["tokens"] == 256
    # a teacher it was not pruned from: exit 2, nothing written
    other = tmp_path / "other"
    tiny_model("llama-gqa", seed=5).save_pretrained(other)
    assert main(["heal", "--model", str(pruned), "--teacher", str(other), "--data", str(text_file), "--tokens", "64",
                 "--seqlen", "16", "--out", str(tmp_path / "bad"), *common]) == 2
    assert not (tmp_path / "bad").exists()


def test_a_heal_that_raises_perplexity_is_reported(tmp_path, model_dir, text_file, monkeypatch, capsys):
    """Healing that leaves the model worse on the held-out text than before warns, with both numbers (prune
    --heal-tokens records the pruned model's perplexity before healing too)."""
    import json

    import torch
    from flap_llm.healing import distill
    from flap_llm.cli import main

    def harmful(student, teacher, data, config, **kw):  # stands in for a heal that went wrong
        with torch.no_grad():  # logits sharpened and reversed: the likeliest tokens become the least likely
            student.model.norm.weight.mul_(-50.0)
        return distill.HealResult(config, steps=1, tokens=data.numel(), seconds=1.0)

    monkeypatch.setattr(distill, "heal", harmful)
    out = tmp_path / "both"
    assert main(["prune", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "16",
                 "--ratio", "0.5", "--heal-tokens", "64", "--out", str(out), "--quiet", "--device", "cpu",
                 "--batch-size", "4", "--eval-limit", "4", "--eval", str(text_file)]) == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["heal"]["ppl_before_heal"], report["perplexity"]["ppl_after"]
    assert after > before > 1
    assert f"healing raised the held-out perplexity on {text_file} from {before:.2f} to {after:.2f}" in \
        capsys.readouterr().err
    assert f"| perplexity pruned, before healing | | {before:.2f} | |" in (out / "report.md").read_text()


def test_an_interrupted_lora_run_leaves_no_adapters_behind(tmp_path, monkeypatch):
    from flap_llm.healing import distill as heal_mod
    student, teacher = _pair()
    names = {n for n, _ in student.named_modules()}

    def crash(path, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(heal_mod, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, calibration(n=8, length=16), HealConfig(tokens=8 * 16 * 4, method="lora",
                                                                        checkpoint_every=1), checkpoint_dir=tmp_path)
    assert {n for n, _ in student.named_modules()} == names
    assert all(p.requires_grad for p in student.parameters())
