"""`speckv` command line.

Each sub-command has an `_add_<name>` function that declares its arguments and points `func`
at a handler. Handlers import their module lazily so `speckv --help` stays instant.
Errors meant for users are raised as `SpecKVError` and printed as one line.
"""

from __future__ import annotations

import argparse
import sys

from speckv.errors import SpecKVError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecKVError as error:
        print(f"speckv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speckv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _add_datasets(sub) -> None:
    parser = sub.add_parser("datasets", help="list, fetch and show benchmark prompt sets")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the prompt sets, their train/heldout sizes and whether they are cached")
    fetch = actions.add_parser("fetch", help="download, verify and extract a set once (then offline)")
    fetch.add_argument("name", help="code, math, chat, summarization, paper, or all")
    show = actions.add_parser("show", help="print the items of a set or of a JSONL prompt file")
    show.add_argument("name", help="a set name, mixed, or a path to a JSONL file")
    show.add_argument("--split", default="all", choices=("train", "heldout", "all"))
    show.add_argument("--limit", type=int, default=5, help="how many items to print (default 5)")
    parser.set_defaults(func=_run_datasets)


def _run_datasets(args) -> int:
    from speckv import datasets

    return datasets.run_cli(args)


def _add_distill(sub) -> None:
    parser = sub.add_parser(
        "distill", help="train a small draft for a target by distillation on the target's own outputs"
    )
    parser.add_argument(
        "--target", default="demo", help="target model: demo, a directory or .gguf (default demo)"
    )
    parser.add_argument(
        "--out", required=True, help="directory to write the draft to (load it with --draft DIR)"
    )
    parser.add_argument("--name", help="the draft's name in its manifest (default <target>-draft)")
    parser.add_argument(
        "--work-dir", help="where data shards and checkpoints go (default ~/.cache/speckv/distill/...)"
    )
    parser.add_argument("--prompts", help="prompt set whose train split is used (default mixed)")
    parser.add_argument(
        "--samples", help="continuations per prompt by task, e.g. code=8,chat=12 (sample 0 greedy)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens per target continuation (default 128)")
    parser.add_argument(
        "--temperature", type=float, help="temperature of the sampled continuations (default 0.8)"
    )
    parser.add_argument("--layers", help="target layers that initialise the draft's layers (default 0,29)")
    parser.add_argument("--vocab", type=int, help="draft output vocabulary size, 0 = full (default 8192)")
    parser.add_argument("--epochs", type=int, help="training epochs (default in docs/draft.md)")
    parser.add_argument("--batch-tokens", type=int, help="response tokens per optimiser step")
    parser.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    parser.add_argument("--ce-weight", type=float, help="weight of the hard (argmax) term of the loss, 0..1")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from speckv import distill

    return distill.run(args)


def _add_paper(sub) -> None:
    parser = sub.add_parser("paper", help="reproduce or audit the SpecKV paper's offline results")
    actions = parser.add_subparsers(dest="paper_action", required=True, metavar="ACTION")
    for action, help_text in (
        ("reproduce", "run the paper's released evaluation protocol, flaws included"),
        ("audit", "evaluate the same data honestly: observed outcomes, leakage, prompt split, cost"),
    ):
        command = actions.add_parser(action, help=help_text)
        command.add_argument("--data", required=True, metavar="DIR", help="folder of the paper's CSVs")
        command.add_argument(
            "--out",
            default=f"paper-{action}",
            metavar="DIR",
            help=f"output folder (default ./paper-{action})",
        )
        command.add_argument("--seed", type=int, default=42, help="bootstrap seed (default 42)")
    parser.set_defaults(func=_run_paper)


def _run_paper(args) -> int:
    from speckv import paper

    return paper.run_command(args.paper_action, args.data, args.out, args.seed)


_COMMANDS: list = [_add_datasets, _add_distill, _add_paper]
