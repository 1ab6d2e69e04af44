"""Arguments and helpers shared by several commands: prompts, precision, CPU threads.

Threads: torch's CPU kernels split every matmul over OpenMP threads that wait for each other at
the end of it, so one thread that loses its core to another process stalls all of them. On the
2-core demo machine two threads ran 15.6 tokens/s alone and 1.4 tokens/s beside one busy process
(issue #12). Rule: `--threads N` wins; else, when torch still has its default (one thread per
physical core), use the physical cores that other processes leave idle, measured over 0.1 s of
/proc/stat, and say so on stderr when that is fewer than all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from speckv.datasets import SPLITS
from speckv.errors import SpecKVError

SPLIT_HELP = "train / heldout (by prompt id hash); dev / test halve heldout; all"
COMPRESSION_HELP = (
    "target compression: auto (bf16 where the CPU or GPU runs it natively, else fp32 on CPU and "
    "fp16 on CUDA), fp32, bf16, fp16, int8, nf4 (default auto)"
)


DRAFT_HELP = (
    "drafter: a draft model (directory, .gguf or HF id; `demo` = the shipped one), ngram[:MIN-MAX] "
    "(model-free, copies from the prompt and output), or DRAFT+ngram (with tree:N: the model's tree plus "
    "an n-gram branch; with chains: the n-gram continuation where the text's suffix repeats, else the model)"
)
CONTROLLER_HELP = (
    "fixed:N | tree:N | heuristic[:N] | confidence[:TAU] | confidence-fixed[:TAU] | speckv[:PATH] "
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
    from speckv.pipeline.local_costs import COSTS_HELP

    parser.add_argument("--costs", default="auto", metavar="auto|shipped|FILE", help=COSTS_HELP)


def apply_costs(args, controller, target, drafter) -> str | None:
    """Give a SpecKV controller the curve of --costs (measured on first use: a progress bar, then
    cached); says on stderr where it came from. None for controllers that plan without costs."""
    from speckv.pipeline.local_costs import give_costs

    source = give_costs(controller, args.costs, target, drafter)
    if source is not None:
        print(f"speckv: SpecKV plans with the {target.precision} cost curve {source}", file=sys.stderr)
    return source


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


def chosen_pair(args) -> str | None:
    """Check --demo / --target / --draft / --no-draft, --gamma and --gamma-max (generate, serve);
    the draft source, None for the target alone."""
    from speckv.controllers import check_gamma

    if args.demo and args.target:
        raise SpecKVError("--demo already chooses the target; drop --target or --demo")
    if not args.demo and not args.target:
        raise SpecKVError("choose a target with --target PATH (or use --demo)")
    from speckv.decoding.draft_files import DEMO_DRAFTER

    draft_source = args.draft or (DEMO_DRAFTER if args.demo and not args.no_draft else None)
    if draft_source is None and not args.no_draft:
        raise SpecKVError("choose a draft with --draft PATH, or --no-draft to decode with the target alone")
    if args.gamma is not None:
        check_gamma(args.gamma)
    check_gamma(args.gamma_max, "--gamma-max")
    return draft_source


def chosen_controller(args, compression: str):
    """The controller of --gamma / --controller, else the default for the pair and level."""
    from speckv.controllers import default_controller, make_controller

    spec = args.controller or (
        f"fixed:{args.gamma}" if args.gamma else default_controller(args.demo, compression)
    )
    return make_controller(spec, gamma_max=args.gamma_max, compression=compression)


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


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, when the user set one."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def configure_threads(threads: int | None, quiet: bool = False) -> int:
    """Apply the thread rule (module docstring); returns the thread count in force."""
    import torch

    if threads is not None:
        if threads < 1:
            raise SpecKVError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        return threads
    cores = physical_cores()
    if torch.get_num_threads() != cores:  # set by the embedding program (or the test suite): keep it
        return torch.get_num_threads()
    busy = busy_cores()
    chosen = max(1, cores - round(busy))
    if chosen < cores and not quiet:
        print(
            f"speckv: other processes keep {busy:.1f} of {cores} cores busy; using {chosen} torch "
            f"thread(s), since threads that share a core stall each other (--threads overrides)",
            file=sys.stderr,
        )
    torch.set_num_threads(chosen)
    return chosen


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    processor, package = -1, ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "processor":
                    processor = int(value)
                elif key == "physical id":
                    package = value
                elif key == "core id" and processor in allowed:
                    cores.add((package, value))
    except (OSError, ValueError):  # not Linux, or an unusual cpuinfo
        pass
    return len(cores) or len(allowed)


def busy_cores(sample_s: float = 0.1) -> float:
    """Cores' worth of CPU time other processes used over `sample_s` while this one slept
    (/proc/stat); the 1-minute load average where /proc/stat does not exist."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]  # user … steal (guest is in user)
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total_before, idle_before = snapshot()
        time.sleep(sample_s)
        total_after, idle_after = snapshot()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = total_after - total_before
    if total <= 0:
        return 0.0
    return (total - (idle_after - idle_before)) / total * (os.cpu_count() or 1)


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
    "busy_cores",
    "configure_threads",
    "physical_cores",
    "prompt_items",
    "set_threads",
    "split_list",
]
