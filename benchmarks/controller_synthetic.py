"""The SpecKV pipeline on synthetic data: tiny random models, a hand-set cost model, exact replay.

    python benchmarks/controller_synthetic.py                 # draft noise 0.004, 90 prompts
    python benchmarks/controller_synthetic.py --noise 0.006

A check of the controller's logic, not of any real model pair: the target is the tests' tiny
random Llama, the draft a noisy copy of it (agreeing on runs of varying length), and the cost
model is set by hand (t_draft 1 ms, t_verify(k) = 10 + 0.5·k ms, 0.2 ms per step). Two thirds of
the prompts train the controller, the rest are replayed with every policy. Runs in about a
minute on one thread; prints the table only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import loaded, perturbed_copy, tiny_model  # noqa: E402

from speckv.costs import CostModel  # noqa: E402
from speckv.pipeline.profiling import record_trace  # noqa: E402
from speckv.pipeline.scoring import policy_specs, replay_policies, summarise  # noqa: E402
from speckv.pipeline.training import train_controller  # noqa: E402
from speckv.util.reporting import markdown_table  # noqa: E402

COST = CostModel("fp32", 0.001, [0.010 + 0.0005 * k for k in range(9)], 0.0002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.004, help="draft weight noise (more: worse draft)")
    parser.add_argument("--prompts", type=int, default=90)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = loaded(tiny_model(seed=0, head_scale=20.0), "target")
    draft = loaded(perturbed_copy(target.model, seed=2, noise=args.noise), "draft")
    rng = np.random.default_rng(0)
    traces = []
    for i in range(args.prompts):
        prompt = rng.integers(2, 64, rng.integers(2, 12)).tolist()
        trace = record_trace(target, draft, prompt, args.new_tokens, 8, eos_token_ids=())
        trace.prompt_id, trace.task = f"synthetic/{i}", "chat"
        traces.append(trace)
    split = 2 * args.prompts // 3
    result = train_controller(traces[:split], {"fp32": COST}, compare_kinds=("linear",))
    with tempfile.TemporaryDirectory() as tmp:
        path = result.models.save(Path(tmp) / "controller.json")
        replayed = replay_policies(traces[split:], {"fp32": COST}, policy_specs(8, str(path)), progress=False)
    summary = summarise(replayed, ["compression"])
    columns = ["policy", "chosen", "tokens_per_step", "mean_gamma", "tokens_per_s", "speedup", "oracle_share"]
    print(f"draft noise {args.noise}: {split} training prompts, {args.prompts - split} replayed\n")
    print(markdown_table(result.metrics, digits=3) + "\n")
    print(markdown_table(summary[columns], digits=3))


if __name__ == "__main__":
    main()
