"""The cost model from engine timings, by hand; its file round trip."""

from __future__ import annotations

import pytest

from speckv.costs import CostModel, load_costs, save_costs
from speckv.pipeline.calibrate import cost_model_from_runs
from speckv.records import GenerationResult, StepRecord


def run(steps: list[tuple[int, float, float]], overhead: float = 0.001) -> GenerationResult:
    """(γ, draft s, verify s) per step; the loop's own time is `overhead` per step."""
    records = [
        StepRecord(i, g, g, 0, 1, drafted=g, draft_time_s=d, verify_time_s=v)
        for i, (g, d, v) in enumerate(steps)
    ]
    total = sum(d + v for _, d, v in steps) + overhead * len(steps)
    return GenerationResult([0] * 10, [0] * len(steps), records, total, "length")


def test_cost_model_by_hand():
    runs = [
        (10, run([(0, 0.0, 0.050), (0, 0.0, 0.010), (0, 0.0, 0.012)])),  # k=1: median 0.011
        (10, run([(1, 0.003, 0.040), (1, 0.002, 0.016), (1, 0.002, 0.014)])),  # k=2: 0.015
        (10, run([(2, 0.005, 0.045), (2, 0.004, 0.013), (2, 0.004, 0.013)])),  # k=3: 0.013
    ]
    cost = cost_model_from_runs("fp32", runs, gamma_max=2)
    # k=3's median dips below k=2's: kept, as CPUs do have such dips (kernel switches).
    assert cost.t_verify_s == pytest.approx([0.011, 0.015, 0.013])
    assert cost.t_draft_s == pytest.approx(0.002)
    assert cost.t_step_s == pytest.approx(0.001)
    # Step 0 reads the 10-token prompt: (0.050 − 0.011) / 10 etc., median over the three runs.
    assert cost.target_prefill_s_per_token == pytest.approx((0.045 - 0.013) / 10)
    assert cost.draft_prefill_s_per_token == pytest.approx(((0.003 - 0.002) / 10 + (0.005 - 0.004) / 10) / 2)
    assert cost.step_times().tolist() == pytest.approx([0.012, 0.018, 0.018])
    assert cost.prefill_time(10, speculative=False) == pytest.approx(0.032)


def test_cost_file_round_trip(tmp_path):
    costs = {"int8": CostModel("int8", 0.002, [0.01, 0.012], 0.001, 0.003, 0.0002)}
    save_costs(costs, tmp_path / "cost.json", {"target": "demo"})
    assert load_costs(tmp_path / "cost.json") == costs
