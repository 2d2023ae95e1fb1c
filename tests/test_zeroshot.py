"""Zero-shot evaluation through lm-evaluation-harness on local data, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flap_llm import FlapError
from flap_llm.eval.zeroshot import SOURCES, TASKS, evaluate_zeroshot, prepare_tasks
from conftest import load_module, tiny_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    model = tiny_model("llama-gqa")
    model.resize_token_embeddings(len(tok))
    return model, tok


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    model, tok = tiny
    return evaluate_zeroshot(model, tok, TASKS, limit=3, batch_size=4)


def test_every_task_runs_offline(results, monkeypatch):
    for task in TASKS:
        r = results[task]
        assert r["n"] == 3
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] is not None
        assert ("acc_norm" in r) == (task not in ("boolq", "winogrande"))
        assert "correct" not in r
    assert results["average"] == pytest.approx(sum(results[t]["acc"] for t in TASKS) / 7)


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_accuracy_matches_an_independent_computation(tiny):
    """lm-eval's acc on our piqa and winogrande data equals argmax log-likelihood computed here, example by
    example (`per_example`)."""
    model, tok = tiny
    folder = prepare_tasks()
    res = evaluate_zeroshot(model, tok, ["piqa", "winogrande"], limit=6, batch_size=2, per_example=True)
    rows = {t: [json.loads(line) for line in open(folder / f"{t}.jsonl")][:6] for t in ("piqa", "winogrande")}
    piqa = [max(range(2), key=lambda i: _loglik(model, tok, r["query"], " " + r["choices"][i])) == r["gold"]
            for r in rows["piqa"]]
    wino = [max(range(2), key=lambda i: _loglik(model, tok, r["contexts"][i], " " + r["continuation"])) == r["gold"]
            for r in rows["winogrande"]]
    assert res["piqa"]["acc"] == pytest.approx(sum(piqa) / 6)
    assert res["winogrande"]["acc"] == pytest.approx(sum(wino) / 6)
    assert res["piqa"]["correct"] == [int(c) for c in piqa]
    assert res["winogrande"]["correct"] == [int(c) for c in wino]


def test_prompts_match_lm_eval_standard_tasks():
    """Our rows equal what lm-eval's own task code builds from the same documents."""
    from flap_llm.eval.zeroshot import _arrow

    raw = _arrow("hellaswag", "none", "validation").select(range(50))
    theirs = load_module(LM_EVAL_TASKS / "hellaswag" / "utils.py").process_docs(raw)
    ours = [r for _, r in zip(range(50), SOURCES["hellaswag"]())]
    for t, o in zip(theirs, ours):
        assert (t["query"], t["choices"], t["gold"]) == (o["query"], o["choices"], o["gold"])

    wino = load_module(LM_EVAL_TASKS / "winogrande" / "preprocess_winogrande.py")
    for doc, o in zip(_arrow("winogrande", "winogrande_xl", "validation").select(range(50)), SOURCES["winogrande"]()):
        assert (wino.doc_to_text(doc), wino.doc_to_choice(doc), wino.doc_to_target(doc)) == (
            o["gold"], o["contexts"], o["continuation"])

    from lm_eval.utils import apply_template
    boolq_doc = _arrow("boolq", "none", "validation")[0]
    ours = next(SOURCES["boolq"]())
    assert ours["query"] == apply_template("{{passage}}\nQuestion: {{question}}?\nAnswer:", boolq_doc)
    piqa_doc = _arrow("piqa", "plain_text", "validation")[0]
    assert next(SOURCES["piqa"]())["query"] == apply_template("Question: {{goal}}\nAnswer:", piqa_doc)


def test_dataset_sizes():
    sizes = {t: sum(1 for _ in SOURCES[t]()) for t in TASKS}
    assert sizes == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                     "arc_challenge": 1172, "openbookqa": 500}


def test_bad_tasks(tiny):
    model, tok = tiny
    with pytest.raises(FlapError, match="unknown task"):
        evaluate_zeroshot(model, tok, ["mmlu"])
    with pytest.raises(FlapError, match="limit"):
        evaluate_zeroshot(model, tok, ["piqa"], limit=0)


def test_cli_eval_tasks(tmp_path, capsys):
    from flap_llm.cli import main
    from conftest import tiny_checkpoint
    model_dir = tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["eval", "--quiet", "--model", str(model_dir), "--no-ppl", "--tasks", "piqa,arc_easy", "--limit", "2",
                 "--json", str(out), "--md", str(tmp_path / "r.md"), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())["zeroshot"]
    assert set(res) >= {"piqa", "arc_easy", "average"} and res["piqa"]["n"] == 2
    assert "| piqa (n=2) |" in (tmp_path / "r.md").read_text()
    assert main(["eval", "--quiet", "--model", str(model_dir), "--tasks", "mmlu"]) == 2
    assert "unknown task" in capsys.readouterr().err
