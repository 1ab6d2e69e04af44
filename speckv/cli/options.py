"""Arguments and helpers shared by several commands: models, prompts, precision, CPU threads
(the thread rule itself is `speckv.util.threads`)."""

from __future__ import annotations

import argparse
import logging

from speckv.datasets import SPLITS
from speckv.errors import SpecKVError

log = logging.getLogger(__name__)

SPLIT_HELP = "train / heldout (by prompt id hash); dev / test halve heldout; all"
COMPRESSION_HELP = (
    "target compression: auto (bf16 where the CPU or GPU runs it natively, else fp32 on CPU and "
    "fp16 on CUDA), fp32, bf16, fp16, int8, nf4 (default auto)"
)


DRAFT_HELP = (
    "drafter: a draft model (directory, .gguf or HF id; `demo` = the shipped one), ngram[:MIN-MAX] "
    "(model-free, copies from the prompt and output), suffix[:MIN-MAX] (the same, also copying from earlier "
    "requests' prompts and outputs), or DRAFT+ngram / DRAFT+suffix (with tree:N: the model's tree plus an "
    "n-gram branch; with chains: the n-gram continuation where the text's suffix repeats, else the model)"
)
CONTROLLER_HELP = (
    "fixed:N | tree:N | heuristic[:N] | confidence[:TAU] | confidence-fixed[:TAU] | speckv[:PATH] | "
    "batch-table[:1=3,2=2,4=1,8=0] (serve: γ by batch size) "
    "(default: with --demo the shipped speckv controller where it knows the compression level, else fixed:4)"
)


def add_model_options(parser, no_draft: bool = True):
    """--demo, --target, --draft (and --no-draft), precision, --device, --threads; the group."""
    models = parser.add_argument_group("models")
    models.add_argument(
        "--demo",
        action="store_true",
        help="the demo pair: SmolLM2-135M-Instruct and the shipped draft (as --draft demo+ngram)",
    )
    models.add_argument("--target", help="Hugging Face id, local model directory or .gguf file")
    drafts = models.add_mutually_exclusive_group()
    drafts.add_argument("--draft", help=DRAFT_HELP)
    if no_draft:
        drafts.add_argument(
            "--no-draft", action="store_true", help="decode with the target alone (the baseline)"
        )
    add_precision_options(models)
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_threads_option(models)
    return models


def add_policy_options(parser) -> None:
    """--gamma or --controller, and --gamma-max."""
    policy = parser.add_argument_group("speculation length")
    choice = policy.add_mutually_exclusive_group()
    choice.add_argument("--gamma", type=int, help="draft exactly this many tokens per step (1-64)")
    choice.add_argument("--controller", help=CONTROLLER_HELP)
    policy.add_argument(
        "--gamma-max", type=int, default=20, help="budget cap for adaptive controllers (default 20)"
    )


def add_costs_option(parser) -> None:
    """--costs: the cost curve a SpecKV controller plans with."""
    from speckv.decoding.local_costs import COSTS_HELP

    parser.add_argument("--costs", default="auto", metavar="auto|shipped|FILE", help=COSTS_HELP)


def add_prompt_options(parser) -> None:
    """--prompt or --prompts (with --split, --limit), and --raw."""
    prompts = parser.add_argument_group("prompts")
    source = prompts.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompts", help="a prompt set name (see `speckv datasets list`) or a JSONL file")
    prompts.add_argument(
        "--split",
        choices=SPLITS,
        help=SPLIT_HELP + " (default: heldout for a named set, all rows of your own JSONL file)",
    )
    prompts.add_argument("--limit", type=int, help="at most this many prompts per task from --prompts")
    prompts.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")


def decoder_spec(args, controller: str | None = None):
    """The `DecoderSpec` of the model and policy options (generate, serve, check-lossless), with
    their checks; `controller` overrides the options' choice."""
    from speckv.controllers import check_gamma
    from speckv.decoding.builder import DecoderSpec

    if args.demo and args.target:
        raise SpecKVError("--demo already chooses the target; drop --target or --demo")
    if not args.demo and not args.target:
        raise SpecKVError("choose a target with --target PATH (or use --demo)")
    target_only = getattr(args, "no_draft", False)
    if not args.draft and not args.demo and not target_only:
        raise SpecKVError("choose a draft with --draft PATH, or --no-draft to decode with the target alone")
    if args.gamma is not None:
        check_gamma(args.gamma)
    check_gamma(args.gamma_max, "--gamma-max")
    if target_only and (args.gamma is not None or args.controller):
        raise SpecKVError("--no-draft decodes with the target alone: drop --gamma / --controller")
    return DecoderSpec(
        target="demo" if args.demo else args.target,
        draft=args.draft,
        controller=controller or args.controller or (f"fixed:{args.gamma}" if args.gamma else None),
        compression=args.compression,
        device=args.device,
        threads=args.threads,
        fp32_head=args.fp32_head,
        gamma_max=args.gamma_max,
        costs=getattr(args, "costs", "auto"),
        target_only=target_only,
    )


def build_decoders(spec):
    """Build the spec's `DecoderFactory`; says (INFO) which cost curve SpecKV plans with."""
    factory = spec.build()
    if factory.cost_source is not None:
        log.info("SpecKV plans with the %s cost curve %s", factory.target.precision, factory.cost_source)
    return factory


def split_list(text: str | None) -> list[str]:
    """Comma-separated values, blanks dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def add_precision_options(group) -> None:
    """--compression (default auto) and --fp32-head/--no-fp32-head."""
    group.add_argument("--compression", default="auto", help=COMPRESSION_HELP)
    group.add_argument(
        "--fp32-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the final norm and LM head of a bf16/fp16 target in fp32 (default off: it costs more "
        "than it saves, docs/compression.md)",
    )


def add_threads_option(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: the physical cores other processes leave idle)",
    )


def prompt_items(args) -> list[tuple[str, str]]:
    """(id, text) of `--prompt` or of `--prompts` (split and per-task limit applied)."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise SpecKVError("the prompt is empty")
        return [("prompt", args.prompt)]
    from speckv.datasets import is_named_set, load_prompts

    split = args.split or ("heldout" if is_named_set(args.prompts) else "all")
    return [(item.id, item.text) for item in load_prompts(args.prompts, split=split, per_task=args.limit)]


__all__ = [
    "COMPRESSION_HELP",
    "SPLITS",
    "SPLIT_HELP",
    "add_precision_options",
    "add_threads_option",
    "prompt_items",
    "split_list",
]
