"""The paired zero-shot comparison of benchmarks/obs.py, on hand-made answers."""

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def obs():
    return benchmark_module("obs")


def _row(name, answers):
    return {"name": name, "zeroshot": {t: {"correct": a} for t, a in answers.items()}}


def test_paired_difference_and_its_standard_error(obs):
    tasks = obs.TASKS
    mine = {t: [1, 1, 0, 0] for t in tasks}
    ref = {t: [1, 0, 1, 0] for t in tasks}
    mine["boolq"], ref["boolq"] = [1, 1, 1, 0], [0, 0, 0, 0]
    p = obs.paired(_row("a", mine), _row("b", ref), 4)
    # boolq: differences 1, 1, 1, 0 (mean 0.75, sample variance 0.25);
    # the six others: 0, 1, -1, 0 (mean 0, sample variance 2/3)
    assert p["diff"] == pytest.approx(0.75 / 7)
    assert p["se"] == pytest.approx(((0.25 / 4) + 6 * (2 / 3) / 4) ** 0.5 / 7)
    assert p["avg"] == pytest.approx((0.75 + 6 * 0.5) / 7)
    assert p["ref_avg"] == pytest.approx(6 * 0.5 / 7)
    assert (p["only_mine"], p["only_ref"]) == (3 + 6, 6)
    # on a prefix: the first two examples only
    p2 = obs.paired(_row("a", mine), _row("b", ref), 2)
    assert p2["diff"] == pytest.approx((1.0 + 6 * 0.5) / 7)
    assert (p2["only_mine"], p2["only_ref"]) == (2 + 6, 0)
    # on the six tasks other than boolq: differences 0, 1, -1, 0 in each
    rest = [t for t in tasks if t != "boolq"]
    p3 = obs.paired(_row("a", mine), _row("b", ref), 4, rest)
    assert p3["diff"] == pytest.approx(0.0)
    assert p3["se"] == pytest.approx((6 * (2 / 3) / 4) ** 0.5 / 6)
    assert (p3["avg"], p3["ref_avg"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (p3["only_mine"], p3["only_ref"]) == (6, 6)


def test_paired_refuses_a_prefix_longer_than_the_answers(obs):
    answers = {t: [1, 0] for t in obs.TASKS}
    with pytest.raises(SystemExit, match="fewer than 3"):
        obs.paired(_row("a", answers), _row("b", answers), 3)


def test_boolq_yes_share_follows_from_the_answers_and_the_golds(obs):
    from itertools import islice
    golds = [d["gold"] for d in islice(obs.SOURCES["boolq"](), 6)]
    always_yes = [int(g == 1) for g in golds]  # right exactly where the gold answer is yes
    assert obs.boolq_says_yes(always_yes) == 1.0
    assert obs.boolq_says_yes([1 - c for c in always_yes]) == 0.0
    right = [1] * 6  # every answer the gold one
    assert obs.boolq_says_yes(right) == pytest.approx(sum(golds) / 6)
    # on a prefix: the golds of the first examples only
    assert obs.boolq_says_yes(right[:2]) == pytest.approx(sum(golds[:2]) / 2)


def test_boolq_by_lean_is_the_accuracy_of_answering_at_random_with_the_same_yes_share(obs):
    from itertools import islice
    golds = [d["gold"] for d in islice(obs.SOURCES["boolq"](), 8)]
    g = sum(golds) / 8
    always_yes = [int(x == 1) for x in golds]
    assert obs.boolq_by_lean(always_yes) == pytest.approx(g)  # always yes: right on the yes questions only
    assert obs.boolq_by_lean([1 - c for c in always_yes]) == pytest.approx(1 - g)
    # every answer right: the yes share is the golds', so the lean alone would give g^2 + (1 - g)^2
    assert obs.boolq_by_lean([1] * 8) == pytest.approx(g * g + (1 - g) ** 2)


def test_render_seeds_pairs_each_draw_with_its_own_baseline_and_averages_the_draws(obs, tmp_path):
    import json
    tasks = obs.TASKS

    def row(name, seed, correct, ppl):
        r = {"model": "m", "ratio": 0.2, "name": name, "ppl_wiki": ppl, "ppl_books": 2 * ppl,
             "zeroshot": {"limit": 4, **{t: {"correct": c} for t, c in correct.items()}}, "command": "x"}
        return r if seed is None else {**r, "seed": seed}

    same = {t: [1, 0, 1, 0] for t in tasks}
    better = {**same, "piqa": [1, 1, 1, 0]}  # one more right answer of 28
    worse = {**same, "arc_easy": [0, 0, 1, 0], "hellaswag": [0, 0, 1, 0]}  # two fewer
    rows = [row("flap+lsq", None, same, 10.0), row("obs held-out", None, better, 9.0),  # seed 0, as old rows
            row("flap+lsq", 1, same, 11.0), row("obs held-out", 1, worse, 9.5),
            row("obs held-out", 2, better, 9.0),  # no FLAP + lsq at seed 2: left out
            {"model": "m", "ratio": 0.0, "name": "dense", "ppl_wiki": 8.0, "command": "x"},
            row("obs", None, worse, 9.2), row("flap+lsq", 5, same, 10.0)]  # one draw only: no mean
    path, again = tmp_path / "r.jsonl", tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the same row in a later file (another run of its plan): shown once, from the first file
    again.write_text(json.dumps(row("obs held-out", 1, better, 9.5)) + "\n")
    lines = [ln for ln in obs.render_seeds([path, again], 4).splitlines() if ln.startswith("| m |")]
    assert len(lines) == 4
    assert "| obs | 0 | 9.20 / 10.00 | 0.600 |" in lines[0] and "| 42.9 / 50.0 | -7.1 ±" in lines[0]
    assert "| obs held-out | 0 | 9.00 / 10.00 | 0.500 | 18.00 / 20.00 | 53.6 / 50.0 | +3.6 ±" in lines[1]  # gap: 1 / 2
    assert "| 1 | 9.50 / 11.00 | 0.500 |" in lines[2] and "| 42.9 / 50.0 | -7.1 ±" in lines[2]
    # averaged over the two draws, the differences per example are piqa (0, .5, 0, 0), arc_easy and hellaswag
    # (-.5, 0, 0, 0) each (means +-.125, sample variances .0625): -.125 / 7 in all, standard error
    # sqrt(3 * .0625 / 4) / 7; without BoolQ the same over 6
    # perplexities: means 9.25 / 10.50 (gap 1.25 / 2.5) and books 18.50 / 21.00
    assert ("| obs held-out | mean of 2 | 9.25 / 10.50 | 0.500 | 18.50 / 21.00 | 48.2 / 50.0 | -1.8 ± 3.1 | "
            "-2.1 ± 3.6 | |") in lines[3]


def test_fisher_spectrum_stats_on_a_hand_made_spectrum():
    import torch
    mod = benchmark_module("fisher_spectrum")
    # eigenvalues 0, 1, 1, ..., 1, 99 in a rotated basis (100 of them, mean 1.97)
    vals = torch.ones(100, dtype=torch.float64)
    vals[0], vals[-1] = 0.0, 99.0
    q, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    s = mod.spectrum_stats(q @ torch.diag(vals) @ q.T, (0.01, 0.6))
    mean = vals.mean().item()
    assert s["median"] == pytest.approx(1 / mean)
    assert s["min"] == pytest.approx(0.0, abs=1e-12)
    assert s["top1pct_share"] == pytest.approx(99 / vals.sum().item())
    assert s["below_0.01"] == pytest.approx(0.01)  # the zero eigenvalue only
    assert s["below_0.6"] == pytest.approx(0.99)  # 1 / 1.97 = 0.51 < 0.6
    # F^(1/2) with ridge r: eigenvalues sqrt(v + r mean), against sqrt(v)
    for r in (0.01, 0.6):
        want = ((vals + r * mean).sqrt() - vals.sqrt()).norm() / vals.sqrt().norm()
        assert s[f"weighting_change_{r}"] == pytest.approx(want.item(), rel=1e-6)


def test_timing_compares_with_the_quality_row_of_its_own_calibration_draw(obs):
    rows = [{"model": "m", "ratio": 0.2, "name": "obs held-out", "plan_sha": "a"},  # no seed: draw 0
            {"model": "m", "ratio": 0.2, "name": "obs held-out", "seed": 1, "plan_sha": "b"},
            {"model": "m", "ratio": 0.2, "name": "flap+lsq", "seed": 1, "plan_sha": "c"},
            {"model": "m", "ratio": 0.5, "name": "obs held-out", "seed": 1, "plan_sha": "d"}]
    assert {k: r["plan_sha"] for k, r in obs.quality_rows(rows, "obs held-out", 0).items()} == {("m", 0.2): "a"}
    assert {k: r["plan_sha"] for k, r in obs.quality_rows(rows, "obs held-out", 1).items()} == {
        ("m", 0.2): "b", ("m", 0.5): "d"}
    assert obs.quality_rows(rows, "obs held-out", 2) == {}
    assert obs.same_plan(obs.quality_rows(rows, "obs held-out", 1)[("m", 0.2)], [], "b") is True
    assert obs.same_plan(obs.quality_rows(rows, "obs held-out", 0)[("m", 0.2)], [], "b") is False


def test_points_signs_a_difference_that_rounds_to_zero_as_plus(obs):
    assert obs.points({"diff": -0.0004, "se": 0.022}) == "+0.0 ± 2.2"
    assert obs.points({"diff": -0.0094, "se": 0.02}) == "-0.9 ± 2.0"
    assert obs.points({"diff": 0.013, "se": 0.017}) == "+1.3 ± 1.7"


def test_render_adds_the_tables_draw_rows_only_other_files_hold_scored_on_the_tables_examples(obs, tmp_path):
    import json
    tasks = obs.TASKS

    def row(name, ppl, limit=None, correct=None, seed=None, avg=None):
        zs = None if limit is None else {"limit": limit, **{t: ({"correct": c} if correct else {}) for t, c in
                                                             (correct or {t: None for t in tasks}).items()}}
        r = {"model": "m", "ratio": 0.2, "name": name, "ppl_wiki": ppl, "ppl_books": 2 * ppl, "removed_decoder": 0.2,
             "prune_s": 10.0 if name == "flap+lsq" else 25.0, "zs_limit": limit or 20, "command": f"run {name}",
             "versions": {}, "zeroshot": zs, "zeroshot_avg": avg}
        return r if seed is None else {**r, "seed": seed}

    table = [{**row("dense", 8.0), "ratio": 0.0, "removed_decoder": 0.0},
             row("flap+lsq", 10.0, 2, avg=0.5), row("obs", 9.5)]
    # four answers per task, the first two right in boolq and one in every other: 1/7 + 6 * 1/2 / 7 on the first two
    answers = {t: [1, 1, 0, 0] if t == "boolq" else [1, 0, 1, 1] for t in tasks}
    extra = [row("obs select 0.01", 9.0, 4, answers, seed=0, avg=0.7),
             row("obs select 0.01", 8.5, 4, answers, seed=1, avg=0.7),  # another draw: not the tables'
             row("obs", 7.0, 4, answers),  # the table has this one
             row("flap+lsq UL-UM", 9.8, 4, seed=0, avg=0.6)]  # more examples but no per-example answers
    path, more = tmp_path / "table.jsonl", tmp_path / "more.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in table))
    more.write_text("".join(json.dumps(r) + "\n" for r in extra))
    lines = [ln for ln in obs.render(path, [more]).splitlines() if ln.startswith("| 20% |")]
    assert [ln.split(" | ")[1] for ln in lines] == ["flap+lsq", "flap+lsq UL-UM", "obs", "obs select 0.01"]
    assert lines[-1] == "| 20% | obs select 0.01 | 20.0% | 9.00 | 0.500 | 18.00 | 57.1 | 25 | 2.50 |"
    assert lines[1].split(" | ")[6] == "–"  # its 4 examples per task cannot be cut to the table's 2
    assert "| 9.50 | 0.750 |" in lines[2]  # the table's own row, not the other file's
    assert "run obs select 0.01" in obs.render(path, [more]) and "run obs select 0.01" not in obs.render(path)
