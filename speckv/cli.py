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


_COMMANDS: list = []
