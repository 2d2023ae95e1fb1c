"""benchmarks/refit_generalization.py's tables, on hand-made rows."""

import json

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def refit():
    return benchmark_module("refit_generalization")


def _row(damp, valid, **variant):
    return {"model": "m", "calib_tokens": 16384, "layer": 3, "removed": 0.2, "damp": damp, "calib_error": 0.1,
            "valid_error": valid, "command": "cmd", **variant}


def test_a_selection_ridge_other_than_the_refits_is_a_variant_measured_against_obs_own(refit, tmp_path):
    rows = [_row(0.1, 0.2),  # before the variants: no fields, obs's own refit
            _row(0.3, 0.25, ridge="uniform", steps=refit.STEPS, select_damp=0.3),
            _row(0.1, 0.18, ridge="uniform", steps=refit.STEPS, select_damp=1.0),
            _row(0.1, 0.22, ridge="uniform", steps=2048, select_damp=0.1)]
    assert [refit.is_default(r) for r in rows] == [True, True, False, False]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = refit.render_variants(path).splitlines()
    assert table[2] == "| m | 16,384 | 3 | 20% | chosen with ridge 1.0 | 0.1 | 0.18000 | 0.900 |"
    assert table[3] == "| m | 16,384 | 3 | 20% | 2048 steps | 0.1 | 0.22000 | 1.100 |"
    # the relative table compares obs's own refits only: 0.2 at damp 0.1 is the best, 0.25 at 0.3 is 1.25x
    assert "| m | 16,384 | 3 | 20% | 1.000 | 1.250 |" in refit.render_relative(path)
