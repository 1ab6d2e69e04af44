"""`speckv` command line.

Each command group is a module of this package with a `register(subparsers)` function that
declares its arguments and points `func` at its handler; handlers import the library lazily so
`speckv --help` stays instant. This is the only place argparse is used: handlers turn arguments
into plain values before calling the library. Errors meant for users are raised as
`SpecKVError` and printed as one line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from speckv.errors import SpecKVError

COMMAND_MODULES = ("demo", "generate", "serve", "check", "datasets", "distill", "paper", "pipeline", "tune")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SpecKVError as error:
        print(f"speckv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`speckv … | head -1`): the Python docs' way to exit quietly.
        # Point stdout at devnull so the final flush at exit cannot raise again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
            pass
        return 1


def _quiet_libraries() -> None:
    """Keep the terminal for our output: no weight-loading bars, no notices about optional kernels."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before main() ran (tests, notebooks)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speckv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"speckv.cli.{name}").register(sub)
    return parser
