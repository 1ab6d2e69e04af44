"""`speckv` command line.

Each command group is a module of this package with a `register(subparsers)` function that
declares its arguments and points `func` at its handler; handlers import the library lazily so
`speckv --help` stays instant. This is the only place argparse is used: handlers turn arguments
into plain values before calling the library. Errors meant for users are raised as
`SpecKVError` and printed as one line (exit 2). The library logs through the `speckv` logger;
here it gets a handler that prints `speckv: message` on stderr (INFO, or as --quiet/--verbose say).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import speckv
from speckv.errors import SpecKVError
from speckv.util.extras import extra_for, install_hint

COMMAND_MODULES = ("demo", "generate", "serve", "check", "datasets", "distill", "paper", "pipeline", "tune")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    _quiet_libraries()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SpecKVError as error:
        print(f"speckv: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = extra_for(error)
        if extra is None:
            raise
        print(
            f"speckv: error: 'speckv {args.command}' needs the {extra} extra: {install_hint(extra)}",
            file=sys.stderr,
        )
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


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not as it was when main() ran: tests and
    notebooks replace sys.stderr between calls."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: int) -> None:
    """`speckv: message` lines on stderr for the `speckv` logger at `level` (one handler, however
    often main() runs in a process). Records still propagate to handlers an embedding program set."""
    logger = logging.getLogger("speckv")
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("speckv: %(message)s"))
        logger.addHandler(handler)


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
    parser.add_argument("--version", action="version", version=f"speckv {speckv.__version__}")
    _add_verbosity(parser, logging.INFO)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"speckv.cli.{name}").register(sub)
    for command in _subcommands(parser):
        # Also after the command (`speckv generate --quiet …`); unset there, so the value given
        # before the command stands.
        _add_verbosity(command, argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    levels = parser.add_argument_group("output").add_mutually_exclusive_group()
    levels.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=logging.WARNING,
        default=default,
        help="warnings and errors only: no progress messages or bars",
    )
    levels.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=logging.DEBUG,
        default=default,
        help="also debugging messages",
    )


def _subcommands(parser: argparse.ArgumentParser):
    """Every parser below `parser` (commands and their actions, as `datasets list`)."""
    for action in parser._actions:  # argparse offers no public way to walk its sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from _subcommands(child)
