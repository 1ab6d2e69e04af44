"""`speckv check-lossless`: is speculative decoding lossless at this precision, on these prompts?

Decodes every prompt greedily target-only and speculatively, replays the speculative tokens
through the target one token at a time, and prints each divergence with its logit margin and the
precision's near-tie tolerance (`speckv.pipeline.lossless`). Exit 0 when every divergence is a
near-tie, 1 otherwise (naming the prompt and position), 2 on bad input.
"""

from __future__ import annotations

import sys

from speckv.cli.options import (
    add_model_options,
    add_policy_options,
    add_prompt_options,
    configure_threads,
    prompt_items,
)
from speckv.errors import SpecKVError


def register(sub) -> None:
    parser = sub.add_parser(
        "check-lossless",
        help="check that speculative output equals target-only output up to near-ties of the precision",
        description="Greedy target-only vs speculative decoding; every divergence must be a near-tie "
        "(the target's top-2 logits within the precision's rounding). Exit 0 if so, 1 if not.",
    )
    add_model_options(parser, no_draft=False)
    add_policy_options(parser)
    add_prompt_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per prompt, then a summary object"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from speckv.controllers import check_gamma, make_controller
    from speckv.decoding.drafters import make_drafter
    from speckv.decoding.models import encode_prompt, load_model, resolve_compression, resolve_device
    from speckv.pipeline.lossless import check_prompt, describe, failures, summary

    if args.demo == bool(args.target):
        raise SpecKVError("choose the target with --target PATH or --demo (not both)")
    from speckv.decoding.draft_files import DEMO_DRAFTER

    draft_source = args.draft or (DEMO_DRAFTER if args.demo else None)
    if draft_source is None:
        raise SpecKVError("choose a draft with --draft PATH")
    if args.gamma is not None:
        check_gamma(args.gamma)
    check_gamma(args.gamma_max, "--gamma-max")
    if args.max_new_tokens < 1:
        raise SpecKVError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    spec = args.controller or f"fixed:{args.gamma or 4}"
    compression = resolve_compression(args.compression, resolve_device(args.device))
    configure_threads(args.threads)
    items = prompt_items(args)

    target = load_model("demo" if args.demo else args.target, compression, args.device, args.fp32_head)
    # Trees for a controller that budgets tree nodes (or sizes trees), as `generate` builds them.
    controller = make_controller(spec, gamma_max=args.gamma_max, compression=target.compression)
    draft = make_drafter(draft_source, target, controller.tree, not controller.needs_tree)
    checks = []
    for item_id, text in items:
        prompt_ids = encode_prompt(target.tokenizer, text, raw=args.raw)
        check = check_prompt(target, draft, spec, prompt_ids, args.max_new_tokens, item_id, args.gamma_max)
        checks.append(check)
        print(json.dumps(check.to_dict()) if args.json else describe(check), flush=True)
    line = summary(checks, f"{target.precision} (compute {target.compute_dtype}), {spec}")
    if args.json:
        print(json.dumps({"summary": line, "lossless": all(c.lossless for c in checks)}))
    else:
        print(line)
    problems = failures(checks)
    for problem in problems:
        print(f"speckv: check-lossless: {problem}", file=sys.stderr)
    return 1 if problems else 0
