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


_COMMANDS: list = [_add_datasets]
