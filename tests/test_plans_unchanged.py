"""Every method's plan and pruned weights, on a tiny model of every family, are those recorded from 0.1's code
(tests/fixtures/plans.json), bit for bit: the layout may change, the arithmetic may not."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.plans import HERE, cases, run

RECORDED = json.loads((HERE / "plans.json").read_text())


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the recording's thread count: reductions split across threads round differently
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch,name", cases())
def test_plan_and_weights_are_the_recorded_ones(arch, name, one_thread):
    got = run(arch, name)
    assert got["plan"] == RECORDED[f"{arch}/{name}"]["plan"]
    assert got["weights"] == RECORDED[f"{arch}/{name}"]["weights"]
