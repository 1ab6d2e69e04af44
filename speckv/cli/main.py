"""`speckv` command line.

Each sub-command has an `_add_<name>` function that declares its arguments and points `func`
at a handler. Handlers import their module lazily so `speckv --help` stays instant.
Errors meant for users are raised as `SpecKVError` and printed as one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from speckv.datasets import SPLITS
from speckv.errors import SpecKVError

SPLIT_HELP = "train / heldout (by prompt id hash); dev / test halve heldout; all"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except SpecKVError as error:
        print(f"speckv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130


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
    show.add_argument("--split", default="all", choices=SPLITS, help=SPLIT_HELP)
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
        "--extra",
        help="extra train prompt sets, comma-separated, or none "
        "(default all: stdlib-code,template-chat,summarization-rest)",
    )
    parser.add_argument(
        "--samples", help="continuations per prompt by task, e.g. code=8,chat=12 (sample 0 greedy)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens per target continuation (default 128)")
    parser.add_argument(
        "--temperature", type=float, help="temperature of the sampled continuations (default 0.8)"
    )
    parser.add_argument("--layers", help="target layers that initialise the draft's layers (default 0,1)")
    parser.add_argument("--vocab", type=int, help="draft output vocabulary size, 0 = full (default 8192)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 4)")
    parser.add_argument("--batch-tokens", type=int, help="response tokens per optimiser step")
    parser.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    parser.add_argument("--ce-weight", type=float, help="weight of the hard (argmax) term of the loss, 0..1")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from speckv.distill import run as distill

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
    from speckv.paper import study as paper

    return paper.run_command(args.paper_action, args.data, args.out, args.seed)


def _add_generate(sub) -> None:
    parser = sub.add_parser(
        "generate",
        help="generate text with speculative decoding (or the target alone)",
        description="Generate with speculative decoding. Greedy output equals the target's own; "
        "sampled output follows the target's distribution.",
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--demo", action="store_true", help="the demo pair: SmolLM2-135M-Instruct and the shipped draft"
    )
    models.add_argument("--target", help="Hugging Face id, local model directory or .gguf file")
    drafts = models.add_mutually_exclusive_group()
    drafts.add_argument("--draft", help="draft model (directory, .gguf or HF id; `demo` for the shipped one)")
    drafts.add_argument("--no-draft", action="store_true", help="decode with the target alone (the baseline)")
    models.add_argument(
        "--compression", default="fp32", help="target compression: fp32, bf16, fp16, int8, nf4 (default fp32)"
    )
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    policy = parser.add_argument_group("speculation length")
    choice = policy.add_mutually_exclusive_group()
    choice.add_argument("--gamma", type=int, help="draft exactly this many tokens per step (1-64)")
    choice.add_argument(
        "--controller",
        help="fixed:N | heuristic[:N] | confidence[:TAU] | confidence-fixed[:TAU] (default fixed:4)",
    )
    policy.add_argument(
        "--gamma-max", type=int, default=20, help="budget cap for adaptive controllers (default 20)"
    )
    prompts = parser.add_argument_group("prompts")
    source = prompts.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompts", help="a prompt set name (see `speckv datasets list`) or a JSONL file")
    prompts.add_argument("--split", default="heldout", choices=SPLITS, help=SPLIT_HELP)
    prompts.add_argument("--limit", type=int, help="at most this many prompts per task from --prompts")
    prompts.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, default=128)
    decoding.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt with the step records"
    )
    parser.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import json

    from speckv.controllers import check_gamma, make_controller
    from speckv.decoding.engine import SpeculativeDecoder
    from speckv.decoding.models import encode_prompt, load_draft, load_model
    from speckv.decoding.verify import SamplingConfig

    if args.demo and args.target:
        raise SpecKVError("--demo already chooses the target; drop --target or --demo")
    if not args.demo and not args.target:
        raise SpecKVError("choose a target with --target PATH (or use --demo)")
    draft_source = args.draft or ("demo" if args.demo and not args.no_draft else None)
    if draft_source is None and not args.no_draft:
        raise SpecKVError("choose a draft with --draft PATH, or --no-draft to decode with the target alone")
    if args.gamma is not None:
        check_gamma(args.gamma)
    check_gamma(args.gamma_max, "--gamma-max")
    controller = None
    if draft_source:
        controller = make_controller(
            args.controller or f"fixed:{args.gamma or 4}",
            gamma_max=args.gamma_max,
            compression=args.compression,
        )
    items = _prompt_items(args)
    sampling = SamplingConfig(args.temperature, args.top_p, args.seed)

    target = load_model("demo" if args.demo else args.target, args.compression, args.device)
    draft = load_draft(draft_source, target) if draft_source else None
    decoder = SpeculativeDecoder(target, draft, controller, sampling)
    for item_id, text in items:
        result = decoder.generate(encode_prompt(target.tokenizer, text, raw=args.raw), args.max_new_tokens)
        output = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        summary = result.summary()
        if args.json:
            record = {
                "id": item_id,
                "text": output,
                "token_ids": result.token_ids,
                "summary": summary,
                "config": {
                    "target": target.name,
                    "draft": draft.name if draft else None,
                    "compression": args.compression,
                    "controller": controller.describe() if controller else None,
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "max_new_tokens": args.max_new_tokens,
                },
                "steps": [step.to_dict() for step in result.steps],
            }
            print(json.dumps(record))
        else:
            if len(items) > 1:
                print(f"== {item_id}")
            print(output)
            print(
                _summary_line(summary, target.name, draft.name if draft else None, controller),
                file=sys.stderr,
            )
    return 0


def _prompt_items(args) -> list[tuple[str, str]]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise SpecKVError("the prompt is empty")
        return [("prompt", args.prompt)]
    from speckv.datasets import load_prompts

    return [
        (item.id, item.text) for item in load_prompts(args.prompts, split=args.split, per_task=args.limit)
    ]


def _summary_line(summary: dict, target: str, draft: str | None, controller) -> str:
    how = f"draft {draft}, {controller.describe()}" if draft else "target only"
    return (
        f"[{summary['new_tokens']} tokens, {summary['steps']} steps, "
        f"mean accepted {summary['mean_accepted']:.2f}, acceptance {summary['acceptance_rate']:.1%}, "
        f"mean gamma {summary['mean_gamma']:.2f}, {summary['tokens_per_s']:.1f} tokens/s | target {target}, {how}]"
    )


def _add_demo(sub) -> None:
    parser = sub.add_parser("demo", help="speculative decoding on the demo pair, with a speed-up table")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes; the table shows the median")
    parser.add_argument("--gamma", type=int, default=3, help="γ for the fixed-γ rows (default 3)")
    parser.add_argument("--compression", default="fp32", help="target compression (default fp32)")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from speckv.cli.demo import run_demo
    from speckv.controllers import check_gamma

    check_gamma(args.gamma)
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise SpecKVError("--repeats and --max-new-tokens must be at least 1")
    return run_demo(args.max_new_tokens, args.repeats, args.gamma, args.compression)


def _add_profile(sub) -> None:
    parser = sub.add_parser(
        "profile",
        help="record replay data and live step records over prompts × compression levels (resumable)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="profile directory (rerun to resume)")
    parser.add_argument("--target", default="demo", help="target model (default demo)")
    parser.add_argument("--draft", default="demo", help="draft model (default demo: the shipped draft)")
    parser.add_argument("--compression", default="fp32", help="comma-separated levels, e.g. fp32,int8,nf4")
    parser.add_argument("--prompts", default="mixed", help="prompt set or JSONL file (default mixed)")
    parser.add_argument("--split", default="all", choices=SPLITS, help=SPLIT_HELP)
    parser.add_argument("--tasks", help="comma-separated tasks to keep (default all)")
    parser.add_argument("--per-task", type=int, help="at most this many prompts per task")
    parser.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gamma-max", type=int, default=8, help="largest γ replay can score (default 8)")
    parser.add_argument(
        "--sweep",
        default="fixed:2,fixed:4,fixed:6,fixed:8",
        help="controllers run live per prompt for step records, comma-separated, or none",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=_run_pipeline("run_profile"))


def _add_calibrate(sub) -> None:
    parser = sub.add_parser(
        "calibrate", help="measure the cost model (t_draft, t_verify(k)) per compression on this machine"
    )
    parser.add_argument("--profile", required=True, metavar="DIR", help="profile whose models to time")
    parser.add_argument("--compression", help="comma-separated levels (default: the profile's)")
    parser.add_argument("--out", help="cost model JSON (default DIR/cost.json; levels are merged in)")
    parser.add_argument(
        "--merge", nargs="+", metavar="FILE", help="only merge the levels of these cost files into --out"
    )
    parser.add_argument("--prompts", default="paper", help="prompts to time on (default paper)")
    parser.add_argument("--per-task", type=int, default=1, help="prompts per task (default 1)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per timed run (default 48)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over prompts × γ (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (use the live runs' setting)")
    parser.set_defaults(func=_run_pipeline("run_calibrate"))


def _add_train(sub) -> None:
    parser = sub.add_parser("train", help="fit the SpecKV controller on a profile's training prompts")
    parser.add_argument("--profile", required=True, metavar="DIR")
    parser.add_argument("--out", required=True, metavar="PATH", help="controller JSON to write")
    parser.add_argument("--costs", help="cost model JSON (default DIR/cost.json)")
    parser.add_argument("--kind", default="mlp16", choices=("mlp16", "linear"), help="live predictor")
    parser.add_argument(
        "--compare", default="linear,gbm", help="predictor kinds also scored on validation prompts"
    )
    parser.add_argument(
        "--split",
        default="dev",
        choices=SPLITS,
        help="prompts to fit on (default dev: the demo draft was distilled on train)",
    )
    parser.set_defaults(func=_run_pipeline("run_train"))


def _add_evaluate(sub) -> None:
    parser = sub.add_parser(
        "evaluate", help="score every γ policy by exact replay (and live runs) on held-out prompts"
    )
    parser.add_argument("--profile", required=True, metavar="DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="where results go")
    parser.add_argument("--controller", metavar="PATH", help="trained SpecKV controller JSON")
    parser.add_argument("--costs", help="cost model JSON (default DIR/cost.json)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="prompts to score (default test)")
    parser.add_argument("--live", action="store_true", help="also decode live and compare to the model")
    parser.add_argument(
        "--live-per-task", type=int, default=2, help="prompts per task and compression, live (default 2)"
    )
    parser.add_argument(
        "--live-fixed", help="γ values of the live fixed-γ rows, e.g. 1,2,3,4 (default 1..γ_max)"
    )
    parser.add_argument("--live-compression", help="levels to run live (default: all profiled)")
    parser.add_argument("--repeats", type=int, default=3, help="live passes (median reported)")
    parser.add_argument("--hf-gammas", default="2,3,4,5,6", help="constant γ of HF assisted rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(func=_run_pipeline("run_evaluate"))


def _add_report(sub) -> None:
    parser = sub.add_parser("report", help="write report.md (tables, figures) from `speckv evaluate` output")
    parser.add_argument("--eval", required=True, metavar="DIR", help="an evaluate --out directory")
    parser.add_argument("--out", metavar="DIR", help="report folder (default DIR/report)")
    parser.set_defaults(func=_run_pipeline("run_report"))


def _run_pipeline(name: str):
    def run(args) -> int:
        from speckv.cli import pipeline

        return getattr(pipeline, name)(args)

    return run


_COMMANDS: list = [
    _add_demo,
    _add_generate,
    _add_datasets,
    _add_distill,
    _add_paper,
    _add_profile,
    _add_calibrate,
    _add_train,
    _add_evaluate,
    _add_report,
]
