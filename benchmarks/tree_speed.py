"""Chains, token trees and n-gram candidates, live on held-out prompts, per task.

    python benchmarks/tree_speed.py                                  # auto precision, 2 prompts per task
    python benchmarks/tree_speed.py --compression int8 --controller runs/tree/ctrl.json --per-task 3

For each task of the four benchmark sets, side by side in one run (median of --repeats passes):
the target alone, chains (fixed γ), trees of 4/8/16/32 nodes grown best-first by the same draft,
the second tree size with an n-gram branch, the n-gram drafter alone, and with `--controller` (a
SpecKV controller file holding a tree model, `speckv train --trees`) SpecKV on chains and SpecKV
sizing trees (alone and with the n-gram branch). Tokens per step, and the distribution of nodes SpecKV verified per step, follow each
table. Writes `tree_speed-<precision>` into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from speckv import datasets
from speckv.controllers.speckv import ControllerModels
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.errors import SpecKVError
from speckv.pipeline.compare import Method, MethodResult, compare, speedup_table
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads

TREE_SPECKV = "tree SpecKV"


def methods(
    gammas: list[int], trees: list[int], ngram: list[int], controllers: dict[str, str]
) -> list[Method]:
    return [
        Method("target only (speckv)"),
        *(Method(f"chain fixed γ={g}", controller=f"fixed:{g}") for g in gammas),
        *([Method("chain SpecKV", controller=f"speckv:{controllers['chain']}")] if controllers else []),
        *(Method(f"tree:{n}", controller=f"tree:{n}") for n in trees),
        *(
            [
                Method(TREE_SPECKV, controller=f"speckv:{controllers['tree']}"),
                Method(
                    f"{TREE_SPECKV} + n-gram branch",
                    controller=f"speckv:{controllers['tree']}",
                    drafter="demo+ngram",
                ),
            ]
            if controllers
            else []
        ),
        *(
            Method(f"tree:{n} + n-gram branch", controller=f"tree:{n}", drafter="demo+ngram")
            for n in trees[1:2]
        ),
        *(Method(f"n-gram fixed γ={g}", controller=f"fixed:{g}", drafter="ngram") for g in ngram),
    ]


def split_controller(path: str, work: Path) -> dict[str, str]:
    """The controller as given (trees) and the same file without its tree model (chains)."""
    models = ControllerModels.load(path)
    if models.tree_model is None:
        raise SpecKVError(f"{path} holds no tree model: train it with `speckv train --trees`")
    models.tree_model = None
    return {"tree": path, "chain": str(models.save(work / "chain-only.json"))}


def node_distribution(results: list[MethodResult]) -> str:
    """How many nodes SpecKV verified per drafting step, as shares."""
    tree = next((r for r in results if r.method.name == TREE_SPECKV), None)
    if tree is None or not tree.verified:
        return ""
    mean = sum(tree.verified) / len(tree.verified)
    return f"Nodes verified per drafting step by tree SpecKV (mean {mean:.1f}): {tree.width_shares()}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="auto", help="target level (default auto)")
    parser.add_argument("--draft", default="demo")
    parser.add_argument("--controller", help="SpecKV controller with a tree model (adds the SpecKV rows)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=2, help="prompts per task")
    parser.add_argument(
        "--split",
        default="test",
        help="prompts to run (default test: held out from the draft, and from a controller fitted on dev)",
    )
    parser.add_argument("--gammas", default="2,3,4", help="chain γ values")
    parser.add_argument("--trees", default="4,8,16,32", help="tree sizes (nodes)")
    parser.add_argument("--ngram", default="2,4", help="γ of the n-gram drafter rows")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    args = parser.parse_args()
    configure_threads(args.threads)

    def numbers(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    target = load_model("demo", args.compression, "cpu")
    draft = load_draft(args.draft, target)
    work = Path(tempfile.mkdtemp(prefix="tree_speed-"))
    controllers = split_controller(args.controller, work) if args.controller else {}
    chosen = methods(numbers(args.gammas), numbers(args.trees), numbers(args.ngram), controllers)
    started = time.time()
    sections = []
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split=args.split, per_task=args.per_task)
        prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
        results = compare(target, draft, prompts, chosen, args.max_new_tokens, args.repeats)
        per_step = "  ".join(f"{r.method.name}: {r.new_tokens / max(r.steps, 1):.2f}" for r in results[1:])
        sections.append(
            f"#### {task} ({len(prompts)} prompts)\n\n{speedup_table(results)}\n\n"
            f"Tokens per step: {per_step}\n\n{node_distribution(results)}"
        )
        print(sections[-1], flush=True)
    body = (
        f"### Chains, trees and n-grams, target {target.precision}, draft {draft.name}\n\n"
        f"{args.split}-split prompts, {args.max_new_tokens} new tokens, greedy, "
        f"median of {args.repeats} passes. Run took {time.time() - started:.0f} s.\n\n" + "\n".join(sections)
    )
    if not args.no_write:
        write_section(f"tree_speed-{target.precision}", body, level=target.precision)


if __name__ == "__main__":
    main()
