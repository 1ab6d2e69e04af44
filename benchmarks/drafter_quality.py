"""How good each drafter of the demo target is on prompts it never saw, per task.

    python benchmarks/drafter_quality.py --drafts demo-model,HEAD_DIR   # draft model vs a head
    python benchmarks/drafter_quality.py --drafts demo-model,DIR --threads 2

For each drafter, on the two reference sets of `speckv distill` (`unfamiliar`: the paper's 20
prompts, in styles the benchmark sets lack; `heldout`: 4 held-out prompts per benchmark task):
- teacher-forced agreement along the target's greedy continuation (128 tokens): the share of
  positions where the drafter's argmax is the target's (γ=1), and where the target's token is in
  its top 4 (what a tree could verify);
- live, greedy, fixed γ=5 on the same prompts: mean accepted tokens per step and the acceptance
  of each drafted position (the chance that drafted token i is accepted);
- the draft cost per token against one target decoding step at the same precision.
Needs the reference data of `speckv distill` (`--work-dir`, default the default data directory).
Writes section `drafter_quality`.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from speckv.controllers import FixedController
from speckv.decoding.draft_files import draft_kind, load_draft
from speckv.decoding.drafters import make_drafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import load_model
from speckv.distill.data import UNFAMILIAR, GenConfig, default_work_dir
from speckv.distill.measure import cost_ratio, loaded_agreement, loaded_head_agreement
from speckv.util.benchmark_header import write_section

GAMMA = 5


def teacher_forced(name: str, target, records: list[dict]) -> dict:
    """Per task {"gamma1", "top4"} (+ "overall")."""
    if draft_kind(name) == "feature":
        result = loaded_head_agreement(make_drafter(name, target), records)
        return {task: {"gamma1": v["gamma1"], "top4": v["top4"]} for task, v in result.items()}
    draft = load_draft(name, target)
    gamma1 = loaded_agreement(draft, records)
    top4 = model_top4(draft, records)
    return {task: {"gamma1": gamma1[task], "top4": top4[task]} for task in gamma1}


@torch.no_grad()
def model_top4(draft, records: list[dict]) -> dict:
    hits, totals = defaultdict(int), defaultdict(int)
    for record in records:
        response = record["response"].long()
        ids = torch.cat([record["prompt"].long(), response[:-1]])[None]
        logits = draft.model(input_ids=ids).logits[0, len(record["prompt"]) - 1 :]
        best = logits.topk(4, -1).indices
        if draft.vocab_map is not None:
            best = draft.vocab_map.cpu()[best]
        target = record["top_idx"][:, 0].long()
        hits[record["task"]] += int((best == target[:, None]).any(-1).sum())
        totals[record["task"]] += len(response)
    result = {task: hits[task] / totals[task] for task in sorted(totals)}
    result["overall"] = sum(result.values()) / len(result)
    return result


def live_acceptance(name: str, target, records: list[dict]) -> dict:
    """Per task: mean accepted tokens per drafting step at fixed γ=5, and per drafted position
    the share accepted (over steps that drafted it)."""
    drafter = make_drafter(name, target)
    decoder = SpeculativeDecoder(target, drafter, FixedController(GAMMA))
    per_task: dict = defaultdict(
        lambda: {"steps": 0, "accepted": 0, "reached": [0] * GAMMA, "kept": [0] * GAMMA}
    )
    for record in records:
        result = decoder.generate(record["prompt"].tolist(), len(record["response"]))
        stats = per_task[record["task"]]
        for step in result.steps:
            if step.gamma == 0:  # a feature head's first step: the target reads the prompt
                continue
            stats["steps"] += 1
            stats["accepted"] += step.accepted
            for position in range(step.gamma):
                stats["reached"][position] += 1
                stats["kept"][position] += position < step.accepted
    out = {}
    for task, stats in sorted(per_task.items()):
        out[task] = {
            "mean_accepted": stats["accepted"] / max(1, stats["steps"]),
            "by_position": [k / max(1, r) for k, r in zip(stats["kept"], stats["reached"], strict=True)],
        }
    out["overall"] = {
        "mean_accepted": sum(v["mean_accepted"] for v in out.values()) / len(out),
        "by_position": [sum(v["by_position"][i] for v in out.values()) / len(out) for i in range(GAMMA)],
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drafts", default="demo-model", help="comma-separated drafter specs (names or directories)"
    )
    parser.add_argument("--compression", default="bf16")
    parser.add_argument("--work-dir", help="a `speckv distill` work directory (default: the default data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = load_model("demo", args.compression)
    work = Path(args.work_dir) if args.work_dir else default_work_dir(target.name, GenConfig())
    sets = {}
    for split in (UNFAMILIAR, "heldout"):
        shards = sorted((work / split).glob("*.pt"))
        if not shards:
            sys.exit(f"error: no {split} data in {work}; run `speckv distill` first or pass --work-dir")
        sets[split] = [r for shard in shards for r in torch.load(shard, mmap=True)]
    lines = [
        "| drafter | prompts | task | γ=1 agreement | top-4 | accepted/step at γ=5 | acceptance by position 1..5 |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    costs = []
    for name in args.drafts.split(","):
        for split, records in sets.items():
            forced = teacher_forced(name, target, records)
            live = live_acceptance(name, target, records)
            for task in [t for t in forced if t != "overall"] + ["overall"]:
                by_position = " / ".join(f"{x:.2f}" for x in live[task]["by_position"])
                lines.append(
                    f"| {name} | {split} ({len(records)}) | {task} | {forced[task]['gamma1']:.3f} | "
                    f"{forced[task]['top4']:.3f} | {live[task]['mean_accepted']:.2f} | {by_position} |"
                )
        drafter = make_drafter(name, target)
        loaded = drafter if draft_kind(name) == "feature" else drafter.loaded
        target_s, draft_s, ratio = cost_ratio(loaded, target, sets["heldout"][0]["prompt"].tolist())
        costs.append(
            f"{name}: {draft_s * 1000:.1f} ms per drafted token, target {target_s * 1000:.1f} ms ({ratio:.3f})"
        )
    body = (
        f"### Drafters of the demo target on prompts they never saw, target {target.precision}\n\n"
        "Teacher-forced agreement along the target's greedy continuation "
        f"(128 tokens) of each reference prompt; live greedy runs at fixed γ={GAMMA} on the same "
        "prompts (the feature head's first step, where the target reads the prompt, is not counted).\n\n"
        + "\n".join(lines)
        + "\n\nDraft cost (batch 1, fastest of 5, alternating with the target): "
        + "; ".join(costs)
        + ".\n"
    )
    print(write_section("drafter_quality", body, level=target.precision, write=not args.no_write))


if __name__ == "__main__":
    main()
