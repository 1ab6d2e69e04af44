"""`speckv tune`: profile → calibrate → train → compare for a new model pair, in one command."""

from __future__ import annotations

from speckv.cli.options import add_threads_option, split_list
from speckv.errors import SpecKVError


def register(sub) -> None:
    parser = sub.add_parser(
        "tune",
        help="fit a SpecKV controller to your model pair on this machine, and compare it with fixed γ",
        description="Profile the pair on fitting prompts, measure this machine's cost curve, train the "
        "controller, then decode held-out test prompts live with SpecKV, every fixed γ and the target "
        "alone. Resumable: rerun the same command to go on where it stopped.",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--demo", action="store_true", help="the demo pair (target demo, draft demo)")
    models.add_argument("--target", help="Hugging Face id (cached), local model directory or .gguf file")
    models.add_argument("--draft", help="the draft model (directory, .gguf or cached HF id)")
    models.add_argument(
        "--compression", default="auto", help="target level: auto, fp32, bf16, fp16, int8, nf4"
    )
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_threads_option(models)
    parser.add_argument("--out", required=True, metavar="DIR", help="tuning folder (rerun to resume)")
    budget = parser.add_argument_group("budget")
    budget.add_argument(
        "--prompts", default="mixed", help="a prompt set or your own JSONL file (default mixed)"
    )
    budget.add_argument("--fit-per-task", type=int, default=3, help="fitting prompts per task (default 3)")
    budget.add_argument(
        "--test-per-task", type=int, default=2, help="held-out test prompts per task, live (default 2)"
    )
    budget.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    budget.add_argument(
        "--gamma-max", type=int, default=8, help="longest draft the controller may plan (default 8)"
    )
    budget.add_argument(
        "--fixed", default="1,2,3,4,6", help="fixed γ rows to compare with (default 1,2,3,4,6)"
    )
    budget.add_argument(
        "--repeats", type=int, default=3, help="timed passes; medians are reported (default 3)"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv.controllers import check_gamma
    from speckv.pipeline.tune import resolve_settings, tune
    from speckv.util.files import check_output_path
    from speckv.util.threads import configure_threads

    if args.demo == bool(args.target):
        raise SpecKVError("choose the pair with --target SRC --draft SRC, or --demo")
    if args.target and not args.draft:
        raise SpecKVError("tune needs --draft SRC: the draft model whose drafting SpecKV will plan")
    check_gamma(args.gamma_max, "--gamma-max")
    fixed = []
    for value in split_list(args.fixed):
        try:
            fixed.append(check_gamma(int(value), "--fixed"))
        except ValueError:
            raise SpecKVError(f"--fixed: '{value}' is not an integer") from None
    if not fixed or len(set(fixed)) != len(fixed):
        raise SpecKVError("--fixed needs distinct γ values, e.g. 1,2,3,4,6")
    for option in ("fit_per_task", "test_per_task", "repeats"):
        if getattr(args, option) < 1:
            raise SpecKVError(f"--{option.replace('_', '-')} must be at least 1")
    if args.max_new_tokens < 2:
        raise SpecKVError("--max-new-tokens must be at least 2")
    check_output_path(args.out, "--out", directory=True)
    configure_threads(args.threads)
    settings = resolve_settings(
        "demo" if args.demo else args.target,
        args.draft or "demo-model",
        args.compression,
        args.device,
        prompts=args.prompts,
        fit_per_task=args.fit_per_task,
        test_per_task=args.test_per_task,
        max_new_tokens=args.max_new_tokens,
        gamma_max=args.gamma_max,
        fixed=tuple(fixed),
        repeats=args.repeats,
    )
    print(tune(args.out, settings, args.device))
    return 0
