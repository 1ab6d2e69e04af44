"""The command-line side of the controller pipeline: profile → calibrate → train → evaluate → report.

`register` declares the five sub-commands; each `run_*` takes its parsed arguments, loads what
it needs, calls the library (profiling, calibrate, training, scoring, live, evaluation, report) and prints
a short summary. A list option that names a value twice is a one-line error, not a silent repeat.
"""

from __future__ import annotations

import sys
from pathlib import Path

from speckv.cli.options import SPLIT_HELP, SPLITS, split_list
from speckv.errors import SpecKVError
from speckv.util.files import check_output_path
from speckv.util.threads import set_threads


def register(sub) -> None:
    for add in (_add_profile, _add_calibrate, _add_train, _add_evaluate, _add_report):
        add(sub)


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
    parser.set_defaults(func=run_profile)


def _add_calibrate(sub) -> None:
    parser = sub.add_parser(
        "calibrate", help="measure the cost model (t_draft, t_verify(k)) per compression on this machine"
    )
    parser.add_argument("--profile", metavar="DIR", help="profile whose models to time")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="measure the curve SpecKV plans with (--costs auto) for --demo or --target/--draft now, "
        "in seconds, and cache it; the profile's models with --profile",
    )
    parser.add_argument("--demo", action="store_true", help="with --quick: the demo pair")
    parser.add_argument(
        "--batch-rows",
        metavar="N,N,…",
        help="with --quick: also time a batch's target pass over these numbers of sequences, as "
        "`speckv serve` does at startup for its batch sizes (e.g. 2,4,8)",
    )
    parser.add_argument("--target", help="with --quick: the target (directory, .gguf or cached HF id)")
    parser.add_argument(
        "--draft",
        help="with --quick: the draft model (default with --demo: the shipped one); ngram or suffix "
        "times the target's passes alone (copies cost no draft pass)",
    )
    parser.add_argument(
        "--compression", help="comma-separated levels (default: the profile's; auto with --quick)"
    )
    parser.add_argument("--out", help="cost model JSON (default DIR/cost.json; levels are merged in)")
    parser.add_argument(
        "--merge", nargs="+", metavar="FILE", help="only merge the levels of these cost files into --out"
    )
    parser.add_argument("--prompts", default="paper", help="prompts to time on (default paper)")
    parser.add_argument("--per-task", type=int, default=1, help="prompts per task (default 1)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per timed run (default 48)")
    parser.add_argument(
        "--gamma-max",
        type=int,
        help="widest step timed, t_verify up to γ+1 tokens (default: the profile's; 16 for trees of 16 nodes)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="passes over prompts × γ (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (use the live runs' setting)")
    parser.set_defaults(func=run_calibrate)


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
    parser.add_argument(
        "--trees",
        action="store_true",
        help="also fit the tree model (loads the profile's draft), so speckv sizes token trees",
    )
    parser.add_argument("--device", default="cpu", help="for the draft pass of --trees")
    parser.set_defaults(func=run_train)


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
    parser.set_defaults(func=run_evaluate)


def _add_report(sub) -> None:
    parser = sub.add_parser("report", help="write report.md (tables, figures) from `speckv evaluate` output")
    parser.add_argument("--eval", required=True, metavar="DIR", help="an evaluate --out directory")
    parser.add_argument("--out", metavar="DIR", help="report folder (default DIR/report)")
    parser.set_defaults(func=run_report)


def _unique_list(text: str | None, option: str) -> list[str]:
    """A comma-separated option's values; a value given twice is a one-line error (it would be
    recorded, replayed or run twice)."""
    values = split_list(text)
    for i, value in enumerate(values):
        if value in values[:i]:
            raise SpecKVError(f"{option} lists {value} twice; give each value once")
    return values


def _int_list(text: str | None, option: str) -> list[int]:
    values = []
    for value in _unique_list(text, option):
        try:
            values.append(int(value))
        except ValueError:
            raise SpecKVError(f"{option}: '{value}' is not an integer") from None
    if len(set(values)) != len(values):
        raise SpecKVError(f"{option} lists a number twice; give each value once")
    return values


def _pair_loader(target_source: str, draft_source: str, device: str):
    """compression -> (target, draft): a draft model, or the drafter of a feature head."""
    from speckv.decoding.draft_files import draft_kind, load_draft, load_feature_drafter
    from speckv.decoding.models import load_model

    feature = draft_kind(draft_source) == "feature"

    def load(compression: str):
        target = load_model(target_source, compression, device)
        if feature:
            return target, load_feature_drafter(draft_source, target)
        return target, load_draft(draft_source, target)

    return load


def _hf_assistant_model(draft_source: str, target):
    """The draft model HF assisted generation runs beside a feature head: the demo's draft model
    for the demo target, none otherwise (HF cannot run a feature head). None for a draft model:
    the HF rows then run the pair's own draft."""
    from speckv.decoding.draft_files import draft_kind, load_draft
    from speckv.decoding.sources import DEMO_TARGET_NAME

    if draft_kind(draft_source) != "feature":
        return None
    if target.name == DEMO_TARGET_NAME:
        return load_draft("demo-model", target)
    print("(HF assisted generation cannot run a feature head: its rows are left out)")
    return None


def _encoded_prompts(args, tokenizer):
    from speckv.datasets import load_prompts
    from speckv.decoding.models import encode_prompt
    from speckv.pipeline.profiling import ProfilePrompt

    tasks = _unique_list(getattr(args, "tasks", None), "--tasks") or None
    items = load_prompts(args.prompts, split=args.split, tasks=tasks, per_task=args.per_task)
    if not items:
        raise SpecKVError(f"no prompts in {args.prompts} (split {args.split})")
    return [
        ProfilePrompt(item.id, item.task, tuple(encode_prompt(tokenizer, item.text, raw=args.raw)))
        for item in items
    ]


def run_profile(args) -> int:
    from speckv.controllers import check_gamma, make_controller
    from speckv.decoding.models import check_compression, load_tokenizer, resolve_device
    from speckv.decoding.sources import resolve_source
    from speckv.pipeline.profiling import ProfileSettings, load_steps, run_profile, summary_markdown

    set_threads(getattr(args, "threads", None))
    check_output_path(args.out, "--out", directory=True)
    check_gamma(args.gamma_max, "--gamma-max")
    if args.max_new_tokens < 2:
        raise SpecKVError("--max-new-tokens must be at least 2")
    compressions = tuple(_unique_list(args.compression, "--compression"))
    if not compressions:
        raise SpecKVError("--compression names no level")
    device = resolve_device(args.device)
    for compression in compressions:
        check_compression(compression, device)
    sweep = () if args.sweep == "none" else tuple(_unique_list(args.sweep, "--sweep"))
    for spec in sweep:
        if spec.partition(":")[0] not in ("speckv", "speckv-step", "speckv-paper"):
            make_controller(spec, gamma_max=args.gamma_max)  # fail now on a bad spec, not hours later
    tokenizer = load_tokenizer(resolve_source(args.target), args.target)
    prompts = _encoded_prompts(args, tokenizer)
    settings = ProfileSettings(
        target=args.target,
        draft=args.draft,
        compressions=compressions,
        max_new_tokens=args.max_new_tokens,
        gamma_max=args.gamma_max,
        sweep=sweep,
    )
    counts = run_profile(args.out, settings, prompts, _pair_loader(args.target, args.draft, str(device)))
    print(f"profile {args.out}: {counts['recorded']} units recorded, {counts['skipped']} already done")
    steps = load_steps(args.out)
    if not steps.empty:
        print(summary_markdown(steps))
    return 0


def run_calibrate(args) -> int:
    from speckv.costs import load_costs, save_costs
    from speckv.datasets import load_prompts
    from speckv.decoding.models import check_context, encode_prompt
    from speckv.pipeline.calibrate import calibrate
    from speckv.pipeline.profiling import read_settings

    if args.quick:
        return _quick_calibrate(args)
    if not args.profile:
        raise SpecKVError("calibrate needs --profile DIR (or --quick with --demo or --target/--draft)")
    set_threads(getattr(args, "threads", None))
    settings, _ = read_settings(args.profile)
    compressions = _unique_list(args.compression, "--compression") or list(settings.compressions)
    if args.gamma_max is not None:
        from speckv.controllers import check_gamma

        check_gamma(args.gamma_max, "--gamma-max")
    out = check_output_path(args.out or Path(args.profile) / "cost.json")
    costs = load_costs(out) if out.exists() else {}
    if args.merge:  # levels timed elsewhere (e.g. in parallel, one process per core): no timing here
        for path in args.merge:
            costs.update(load_costs(path))
        save_costs(costs, out, {"target": settings.target, "draft": settings.draft})
        print(f"{out}: levels {', '.join(costs)}")
        return 0
    load = _pair_loader(settings.target, settings.draft, args.device)
    items = load_prompts(args.prompts, split="all", per_task=args.per_task)
    for compression in compressions:
        target, draft = load(compression)
        prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
        for prompt in prompts:
            check_context(target, draft, len(prompt), args.new_tokens)
        costs[compression] = calibrate(
            target, draft, prompts, args.gamma_max or settings.gamma_max, args.new_tokens, args.repeats
        )
        save_costs(costs, out, {"target": settings.target, "draft": settings.draft})
        cost = costs[compression]
        verify = ", ".join(f"{1e3 * t:.1f}" for t in cost.t_verify_s)
        print(
            f"{compression}: t_draft {1e3 * cost.t_draft_s:.2f} ms, t_verify(1..{cost.gamma_max + 1}) "
            f"[{verify}] ms, t_step {1e3 * cost.t_step_s:.2f} ms"
        )
    print(f"cost model written to {out}")
    return 0


def _quick_calibrate(args) -> int:
    """`calibrate --quick`: this machine's curve for a pair, measured now and cached for --costs auto."""
    from speckv.decoding.drafters import COPYING
    from speckv.decoding.local_costs import local_costs
    from speckv.decoding.models import LoadedModel, load_model, resolve_compression, resolve_device
    from speckv.pipeline.profiling import read_settings
    from speckv.util.threads import configure_threads

    if args.profile:
        settings, _ = read_settings(args.profile)
        target_source, draft_source = settings.target, settings.draft
    elif args.demo == bool(args.target):
        raise SpecKVError("calibrate --quick needs --demo, --target SRC --draft SRC, or --profile DIR")
    else:
        target_source, draft_source = (
            ("demo", args.draft or "demo-model") if args.demo else (args.target, args.draft)
        )
    if not draft_source:
        raise SpecKVError("calibrate --quick needs --draft SRC: the draft model to time")
    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    levels = _unique_list(args.compression, "--compression") or ["auto"]
    rows = tuple(_int_list(args.batch_rows, "--batch-rows"))
    if any(r < 2 for r in rows):
        raise SpecKVError("--batch-rows are numbers of sequences, each at least 2")
    copies_only = draft_source.partition(":")[0] in COPYING  # no draft model: the target alone
    load = None if copies_only else _pair_loader(target_source, draft_source, str(device))
    for level in levels:
        compression = resolve_compression(level, device)
        if load is None:
            target, draft = load_model(target_source, compression, str(device)), None
        else:
            target, draft = load(compression)
            if not isinstance(draft, LoadedModel):
                raise SpecKVError(f"{draft_source} is a feature head: --quick times a draft model")
        # γ_max 8 covers the shipped controller; a controller planning wider steps asks --gamma-max.
        chosen = local_costs("auto", target, draft, args.gamma_max or 8, remeasure=True, batch_rows=rows)
        cost = chosen.cost
        verify = ", ".join(f"{1e3 * t:.1f}" for t in cost.t_verify_s)
        print(
            f"{target.precision}, {threads} thread(s): t_draft {1e3 * cost.t_draft_s:.2f} ms, "
            f"t_verify(1..{cost.gamma_max + 1}) [{verify}] ms — {chosen.source}"
        )
        for count, times in sorted(cost.t_pass_s.items()):
            print(
                f"  batch of {count}: t_pass(1..{len(times)}) [{', '.join(f'{1e3 * t:.1f}' for t in times)}] ms"
            )
    return 0


def _traces(profile: str, split: str):
    from speckv.datasets import in_split
    from speckv.pipeline.profiling import load_traces

    traces = load_traces(profile)
    chosen = [t for t in traces if in_split(t.prompt_id, split)]
    if not chosen:
        raise SpecKVError(f"{profile} has no replay data of {split} prompts")
    return chosen


def _per_task(traces: list, count: int) -> list:
    """The first `count` traces of each task, tasks interleaved (balanced live runs)."""
    by_task: dict[str, list] = {}
    for trace in traces:
        by_task.setdefault(trace.task, []).append(trace)
    rounds = [[rows[i] for rows in by_task.values() if i < len(rows)] for i in range(count)]
    return [trace for chosen in rounds for trace in chosen]


def _costs(args):
    from speckv.costs import load_costs

    path = Path(args.costs or Path(args.profile) / "cost.json")
    if not path.exists():
        raise SpecKVError(f"no cost model at {path}; run `speckv calibrate --profile {args.profile}`")
    return load_costs(path)


def run_train(args) -> int:
    from speckv.controllers.predictor import KINDS
    from speckv.pipeline.profiling import read_settings
    from speckv.pipeline.training import train_controller
    from speckv.util.reporting import markdown_table

    check_output_path(args.out)
    traces = _traces(args.profile, args.split)
    compare_kinds = tuple(_unique_list(args.compare, "--compare"))
    unknown = [k for k in compare_kinds if k not in KINDS]
    if unknown:
        raise SpecKVError(f"unknown predictor kinds {unknown}; choose from {', '.join(KINDS)}")
    settings, prompts = read_settings(args.profile)
    result = train_controller(
        traces,
        _costs(args),
        kind=args.kind,
        compare_kinds=compare_kinds,
        info={"pair": settings.pair, "profile": str(args.profile), "split": args.split},
    )
    print(markdown_table(result.metrics, digits=4))
    if args.trees:
        _fit_trees(result.models, traces, prompts, settings, args)
    path = result.models.save(args.out)
    print(
        f"controller written to {path} ({path.stat().st_size / 1024:.0f} KiB); use --controller speckv:{path}"
    )
    return 0


def _fit_trees(models, traces, prompts, settings, args) -> None:
    from speckv.decoding.models import LoadedModel
    from speckv.pipeline.training import is_validation
    from speckv.pipeline.tree_training import fit_tree_model, tree_rows

    _, draft = _pair_loader(settings.target, settings.draft, args.device)(models.compressions[0])
    if not isinstance(draft, LoadedModel):
        raise SpecKVError(
            "--trees fits the tree model of a draft model; this profile's drafter is a feature head"
        )
    token_ids = {prompt["id"]: list(prompt["token_ids"]) for prompt in prompts}
    rows = tree_rows(traces, token_ids, draft, models.compressions, decay=models.context_decay)
    validation = rows["prompt_id"].map(is_validation).to_numpy()
    models.tree_model, scores = fit_tree_model(rows, models.compressions, validation, args.kind)
    models.info["tree"] = {**scores, "rows": len(rows)}
    print(
        f"tree model: {len(rows)} candidate rows, validation AUC {scores['auc']:.3f}, Brier "
        f"{scores['brier']:.4f}; accepted: top choice {scores['base_rate_top_choice']:.3f}, "
        f"others {scores['base_rate_other']:.3f}"
    )


def run_evaluate(args) -> int:
    import pandas as pd

    from speckv.controllers import check_gamma
    from speckv.controllers.speckv import ControllerModels
    from speckv.pipeline.evaluation import CONSISTENCY_FILE, LIVE_FILE, REPLAY_FILE, EvaluationWriter
    from speckv.pipeline.live import live_evaluation
    from speckv.pipeline.profiling import load_steps, read_settings
    from speckv.pipeline.scoring import policy_specs, replay_consistency, replay_policies, summarise
    from speckv.util.reporting import markdown_table

    set_threads(getattr(args, "threads", None))
    check_output_path(args.out, "--out", directory=True)
    settings, profile_prompts = read_settings(args.profile)
    live_levels = _unique_list(args.live_compression, "--live-compression") or list(settings.compressions)
    unknown = [c for c in live_levels if c not in settings.compressions]
    if unknown:
        raise SpecKVError(
            f"--live-compression {', '.join(unknown)}: the profile has {', '.join(settings.compressions)}"
        )
    hf_gammas = tuple(_int_list(args.hf_gammas, "--hf-gammas"))
    for gamma in hf_gammas:
        check_gamma(gamma, "--hf-gammas")
    prompt_ids = {p["id"]: p["token_ids"] for p in profile_prompts}
    traces = _traces(args.profile, args.split)
    costs = _costs(args)
    controller_info = ControllerModels.load(args.controller).info if args.controller else {}
    gamma_max = min(t.gamma_max for t in traces)
    specs = policy_specs(gamma_max, args.controller)
    live_fixed = _int_list(getattr(args, "live_fixed", None), "--live-fixed")
    outside = [g for g in live_fixed if not 1 <= g <= gamma_max]
    if outside:
        raise SpecKVError(f"--live-fixed {outside[0]}: the profile's γ_max is {gamma_max} (γ from 1 to it)")
    chosen_fixed = {f"fixed:{g}" for g in live_fixed}
    live_specs = [s for s in specs if not chosen_fixed or not s.startswith("fixed:") or s in chosen_fixed]
    with EvaluationWriter(args.out) as writer:
        results = replay_policies(traces, costs, specs)
        writer.write(REPLAY_FILE, results)
        consistency = replay_consistency(traces, load_steps(args.profile), gamma_max)
        if not consistency.empty:
            writer.write(CONSISTENCY_FILE, consistency)
            print(markdown_table(consistency))
        summary = summarise(results, ["compression"])
        columns = ["compression", "policy", "chosen", "tokens_per_step", "tokens_per_s", "speedup"]
        print(markdown_table(summary[[*columns, "oracle_share"]]))
        if args.live:
            load = _pair_loader(settings.target, settings.draft, args.device)
            frames = []
            for compression in live_levels:
                chosen = _per_task([t for t in traces if t.compression == compression], args.live_per_task)
                if not chosen:
                    continue
                target, draft = load(compression)
                prompts = [list(prompt_ids[t.prompt_id]) for t in chosen]
                frames.append(
                    live_evaluation(
                        target,
                        draft,
                        chosen,
                        prompts,
                        live_specs,
                        costs[compression],
                        args.repeats,
                        hf_gammas,
                        assistant=_hf_assistant_model(settings.draft, target),
                    )
                )
            if not frames:
                raise SpecKVError(
                    f"the profile has no {args.split} prompts at {', '.join(live_levels)} to run live"
                )
            live = pd.concat(frames, ignore_index=True)
            writer.write(LIVE_FILE, live)
            print(markdown_table(live))
        out = writer.commit(
            {
                "profile": str(args.profile),
                "pair": settings.pair,
                "max_new_tokens": settings.max_new_tokens,
                "gamma_max": gamma_max,
                "split": args.split,
                "controller": args.controller,
                "controller_info": controller_info,
            }
        )
    print(f"evaluation written to {out}; `speckv report --eval {out}` writes the report", file=sys.stderr)
    return 0


def run_report(args) -> int:
    from speckv.pipeline.evaluation import REPORT_DIR
    from speckv.pipeline.report import write_report

    path = write_report(args.eval, args.out or Path(args.eval) / REPORT_DIR)
    print(f"report written to {path}")
    return 0
