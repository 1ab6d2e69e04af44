"""How much a draft overfits its training prompts: agreement on train vs held-out continuations.

    python benchmarks/draft_fit.py                          # the shipped demo draft model
    python benchmarks/draft_fit.py --drafts demo-model,OLD  # several drafts, side by side

Teacher-forced greedy agreement with the demo target (the share of positions where the draft's
argmax equals the target's) on the target's greedy continuations of `--per-task` train prompts of
each benchmark task (drawn with a fixed seed from the `speckv distill` data; the offline-built
`extra/` prompts are left out) and on the distill held-out reference (4 prompts per task).
A controller fitted on prompts where the draft agrees far more often than on new ones would trust
it too much; this is why `speckv train` fits on `dev`. Needs the data of a `speckv distill` run
(`--work-dir`, default the shipped draft's data directory). Writes section `draft_fit`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import load_model
from speckv.distill.data import GenConfig, default_work_dir
from speckv.distill.measure import loaded_agreement
from speckv.util.benchmark_header import write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drafts", default="demo-model", help="comma-separated draft model directories or `demo-model`"
    )
    parser.add_argument("--per-task", type=int, default=4, help="train prompts per task (default 4)")
    parser.add_argument("--work-dir", help="a `speckv distill` work directory (default: the shipped data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = load_model("demo", "fp32", device="cpu")
    gen = GenConfig()
    work = Path(args.work_dir) if args.work_dir else default_work_dir(target.name, gen)
    if not (work / "train").is_dir():
        sys.exit(f"error: no distill data in {work}; run `speckv distill --target demo` or pass --work-dir")
    # Only shards already on disk: this script measures, it never generates.
    records = [r for shard in sorted((work / "train").glob("*.pt")) for r in torch.load(shard)]
    greedy = sorted(
        (r for r in records if r["greedy"] and not r["id"].startswith("extra/")), key=lambda r: r["id"]
    )
    random.Random(0).shuffle(greedy)
    train_sample: dict[str, list] = {}
    for record in greedy:
        if len(train_sample.setdefault(record["task"], [])) < args.per_task:
            train_sample[record["task"]].append(record)
    train = [r for task in sorted(train_sample) for r in train_sample[task]]
    heldout = [r for shard in sorted((work / "heldout").glob("*.pt")) for r in torch.load(shard)]

    tasks = sorted(train_sample) + ["overall"]
    lines = [
        "| draft | prompts | " + " | ".join(tasks) + " |",
        "|---|---|" + "---:|" * len(tasks),
    ]
    with torch.no_grad():
        for name in args.drafts.split(","):
            draft = load_draft(name, target)
            for label, sample in (("train", train), ("held-out", heldout)):
                agreement = loaded_agreement(draft, sample)
                cells = " | ".join(f"{agreement.get(task, float('nan')):.3f}" for task in tasks)
                lines.append(f"| {name} | {label} ({len(sample)}) | {cells} |")
    body = (
        f"### Draft agreement on train vs held-out prompts, demo target {target.precision}\n\n"
        "Teacher-forced greedy agreement along the target's greedy continuations "
        f"(128 tokens): {args.per_task} train prompts per task from `{work.name}`, and the distill "
        "held-out reference.\n\n" + "\n".join(lines) + "\n"
    )
    print(write_section("draft_fit", body, level=target.precision, write=not args.no_write))


if __name__ == "__main__":
    main()
