"""`speckv datasets`: list, fetch and show benchmark prompt sets."""

from __future__ import annotations

from speckv.cli.options import SPLIT_HELP, SPLITS


def register(sub) -> None:
    parser = sub.add_parser("datasets", help="list, fetch and show benchmark prompt sets")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the prompt sets, their train/heldout sizes and whether they are cached")
    fetch = actions.add_parser("fetch", help="download, verify and extract a set once (then offline)")
    fetch.add_argument("name", help="code, math, chat, summarization, paper, or all")
    show = actions.add_parser("show", help="print the items of a set or of a JSONL prompt file")
    show.add_argument("name", help="a set name, mixed, or a path to a JSONL file")
    show.add_argument("--split", default="all", choices=SPLITS, help=SPLIT_HELP)
    show.add_argument("--limit", type=int, default=5, help="how many items to print (default 5)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv import datasets

    if args.action == "list":
        print(datasets.sets_table())
    elif args.action == "fetch":
        for name in datasets.SETS if args.name == "all" else (args.name,):
            print(f"{name}: {datasets.fetch(name)}")
    else:
        print(datasets.show_text(args.name, args.split, args.limit))
    return 0
