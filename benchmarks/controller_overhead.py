"""Decision overhead of the SpecKV controller: microseconds per call on this CPU.

    python benchmarks/controller_overhead.py                     # the shipped controller, or a stand-in
    python benchmarks/controller_overhead.py --controller PATH   # a trained controller file

Times every call the engine makes into the controller (begin_step, continue_drafting,
verify_count, end_step)
one by one with perf_counter_ns, on realistic inputs, and the same prediction through
scikit-learn for comparison (the SpecKV paper reports 340 µs per decision with it). Without a
trained file it fits stand-in predictors of the live shapes (MLP, 16 hidden units; 3
compression levels) on random rows: the cost of a decision depends on the shapes only.
Writes its table into benchmarks/RESULTS.md (section `controller_overhead`) unless --no-write.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from time import perf_counter_ns

import numpy as np
import pandas as pd
import torch

from speckv.controllers.predictor import AcceptancePredictor
from speckv.controllers.speckv import (
    SHIPPED,
    ControllerModels,
    SpecKVController,
    context_features,
    paper_features,
    token_features,
)
from speckv.controllers.speckv_variants import SpecKVPaperController
from speckv.costs import CostModel
from speckv.records import StepRecord, TokenSignals
from speckv.util.benchmark_header import write_section
from speckv.util.reporting import markdown_table

BUDGET_US = 20.0


def stand_in_models() -> ControllerModels:
    levels = ("fp32", "int8", "nf4")
    rng = np.random.default_rng(0)

    def fitted(kind: str, features) -> AcceptancePredictor:
        rows = rng.random((400, len(features)))
        return AcceptancePredictor(kind, features).fit(rows, rng.random(400))

    cost = CostModel("fp32", 0.004, [0.03 + 0.002 * k for k in range(9)], 0.0005)
    return ControllerModels(
        compressions=levels,
        gamma_max=8,
        token_model=fitted("mlp16", token_features(levels)),
        prior_model=fitted("mlp16", context_features(levels)),
        paper_model=fitted("mlp16", paper_features(levels)),
        costs={level: cost for level in levels},
        rates={level: 20.0 for level in levels},
        info={"stand_in": True},
    )


def time_calls(function, arguments, count: int) -> np.ndarray:
    """Microseconds of each call, cycling through `arguments`."""
    timings = np.empty(count)
    for i in range(count):
        argument = arguments[i % len(arguments)]
        start = perf_counter_ns()
        function(argument)
        timings[i] = perf_counter_ns() - start
    return timings / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller", help="controller JSON (default: shipped, else a stand-in)")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one decision)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.controller) if args.controller else SHIPPED
    models = ControllerModels.load(path) if path.exists() else stand_in_models()
    source = str(path) if path.exists() else "stand-in weights (no trained file)"
    level = models.compressions[0]
    rng = np.random.default_rng(1)
    signals = [
        TokenSignals(int(p), float(e), float(c), float(c))
        for p, e, c in zip(
            rng.integers(1, 8, 256), rng.uniform(0, 6, 256), rng.uniform(0, 1, 256), strict=True
        )
    ]
    records = []
    for _ in range(64):
        gamma = int(rng.integers(1, 9))
        accepted = int(rng.integers(0, gamma + 1))
        entropy = rng.uniform(0, 6, gamma).tolist()
        confidence = rng.uniform(0, 1, gamma).tolist()
        records.append(
            StepRecord(
                0, gamma, gamma, accepted, accepted + 1, entropy, confidence, confidence, drafted=gamma
            )
        )

    ours = SpecKVController(models, level, 8)
    step = SpecKVController(models, level, 8, per_token=False)
    paper = SpecKVPaperController(models, level, 8)
    ours.begin_step()

    def draft_step(record):
        """begin_step and continue_drafting over all but the last token, as the engine calls them."""
        ours.begin_step()
        for position in range(1, record.gamma):
            signals = record.draft_entropy[position - 1], record.draft_confidence[position - 1]
            ours.continue_drafting(TokenSignals(position, *signals, signals[1]))

    def one_step(record):
        draft_step(record)
        ours.verify_count(record)
        ours.end_step(record)

    def verify_timings(count: int) -> np.ndarray:
        """verify_count alone (it reads the last token's signals and picks the prefix)."""
        timings = np.empty(count)
        for i in range(count):
            record = records[i % len(records)]
            draft_step(record)
            start = perf_counter_ns()
            ours.verify_count(record)
            timings[i] = perf_counter_ns() - start
        return timings / 1e3

    x = np.zeros((1, len(token_features(models.compressions))))
    sklearn_model = AcceptancePredictor("mlp16", token_features(models.compressions)).fit(
        rng.random((400, x.shape[1])), rng.random(400)
    )
    cases = [
        ("speckv begin_step (plan with the prior)", lambda _: ours.begin_step(), [None]),
        ("speckv continue_drafting (one token)", ours.continue_drafting, signals),
        ("speckv verify_count (last token + prefix)", None, None),
        ("speckv end_step (context update)", ours.end_step, records),
        ("speckv-step begin_step (choose γ)", lambda _: step.begin_step(), [None]),
        ("speckv-paper begin_step (4 candidates)", lambda _: paper.begin_step(), [None]),
        ("speckv whole step (begin + ≤7 continue + verify + end)", one_step, records),
        ("same MLP via scikit-learn predict (reference)", lambda _: sklearn_model.predict(x), [None]),
    ]
    rows = []
    for name, function, arguments in cases:
        count = args.calls if "scikit" not in name else max(args.calls // 10, 100)
        if function is None:
            verify_timings(min(count, 500))  # warm-up
            timings = verify_timings(count)
        else:
            time_calls(function, arguments, min(count, 500))  # warm-up
            timings = time_calls(function, arguments, count)
        rows.append(
            {
                "call": name,
                "calls": count,
                "median_us": float(np.median(timings)),
                "p90_us": float(np.percentile(timings, 90)),
                "mean_us": float(timings.mean()),
            }
        )
    table = markdown_table(pd.DataFrame(rows), digits=2)
    per_decision = max(r["median_us"] for r in rows[:6])
    body = (
        f"### SpecKV controller decision overhead\n\nController: {source}; numpy {np.__version__}. "
        f"Each call timed alone (perf_counter_ns); budget {BUDGET_US:.0f} µs per decision; "
        f"slowest single decision (median): {per_decision:.1f} µs.\n\n{table}\n"
    )
    print(write_section("controller_overhead", body, level=level, write=not args.no_write))


if __name__ == "__main__":
    main()
