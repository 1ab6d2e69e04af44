"""How well SpecKV's acceptance predictions hold on unfamiliar text, before and after the live
per-sequence calibration (`speckv.controllers.live.LiveAcceptance`).

    python benchmarks/live_calibration.py --compression fp32 --threads 2

Decodes prompts of the test split (never fitted on) and the paper's prompts with the shipped
controller, and logs, for every drafted token the target judged, the token model's raw
prediction, the calibrated one the controller used (computed before that step's outcome was
seen: prequential, so the correction is scored on what it had not yet observed) and the outcome.
Writes `live_calibration-<precision>` into benchmarks/RESULTS.md: per bin of the raw prediction,
mean raw, mean calibrated, observed acceptance and count, plus Brier scores.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from speckv import datasets
from speckv.controllers import make_controller
from speckv.controllers.speckv import SpecKVController
from speckv.decoding.draft_files import load_draft
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.local_costs import give_costs
from speckv.decoding.models import encode_prompt, load_model
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads


def logged(controller: SpecKVController, rows: list[tuple[float, float, int]]) -> SpecKVController:
    """The controller, logging (raw, calibrated, accepted) for each judged token of a chain step."""
    end_step = controller.end_step

    def logging_end_step(record) -> None:
        if record.gamma:
            controller._observe_record(record)
            for i, raw in enumerate(controller._raw[: min(record.accepted + 1, record.gamma)]):
                rows.append((raw, controller.acceptance.correct(raw), int(i < record.accepted)))
        end_step(record)

    controller.end_step = logging_end_step
    return controller


def table(frame: pd.DataFrame) -> str:
    frame = frame.assign(bin=np.minimum((frame.raw.clip(0, 1) * 5).astype(int), 4))
    lines = [
        "| raw prediction | mean raw | mean calibrated | observed | tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for b, part in frame.groupby("bin"):
        lines.append(
            f"| {b / 5:.1f}–{(b + 1) / 5:.1f} | {part.raw.mean():.3f} | {part.calibrated.mean():.3f} | "
            f"{part.accepted.mean():.3f} | {len(part)} |"
        )
    brier = {c: float(((frame[c].clip(0, 1) - frame.accepted) ** 2).mean()) for c in ("raw", "calibrated")}
    lines.append(
        f"\nAll: mean raw {frame.raw.mean():.3f}, calibrated {frame.calibrated.mean():.3f}, observed "
        f"{frame.accepted.mean():.3f}; Brier raw {brier['raw']:.4f}, calibrated {brier['calibrated']:.4f}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--per-task", type=int, default=3, help="test-split prompts per task")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    configure_threads(args.threads)
    target = load_model("demo", args.compression, "cpu")
    draft = load_draft("demo", target)
    items = datasets.load_prompts("paper", split="all")
    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)
        items += datasets.load_prompts(task, split="test", per_task=args.per_task)
    rows: list[tuple[float, float, int]] = []
    controller = make_controller("speckv", compression=target.compression)
    decoder = SpeculativeDecoder(target, draft, controller)
    give_costs(controller, "auto", target, decoder.drafter)
    logged(controller, rows)
    for item in items:
        decoder.generate(encode_prompt(target.tokenizer, item.text), args.max_new_tokens)
    body = (
        f"### Acceptance predictions on unfamiliar text, before and after live calibration ({target.precision})\n\n"
        f"{len(items)} prompts (the paper's 20 and {args.per_task} test-split prompts per task), "
        f"{args.max_new_tokens} new tokens, shipped controller, greedy.\n\n"
        + table(pd.DataFrame(rows, columns=["raw", "calibrated", "accepted"]))
    )
    print(body)
    if not args.no_write:
        write_section(f"live_calibration-{target.precision}", body, level=target.precision)


if __name__ == "__main__":
    main()
