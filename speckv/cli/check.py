"""`speckv check-lossless`: is speculative decoding lossless at this precision, on these prompts?

Decodes every prompt greedily target-only and speculatively, replays the speculative tokens
through the target one token at a time, and prints each divergence with its logit margin and the
precision's near-tie tolerance (`speckv.pipeline.lossless`). Exit 0 when every divergence is a
near-tie, 1 otherwise (naming the prompt and position), 2 on bad input.
"""

from __future__ import annotations

import sys

from speckv.cli.options import (
    add_costs_option,
    add_model_options,
    add_policy_options,
    add_prompt_options,
    build_decoders,
    decoder_spec,
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
    add_costs_option(parser)
    add_prompt_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="decode the prompts speculatively N at a time in one target pass, as `speckv serve` "
        "batches its running requests (default 1: each alone)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per prompt, then a summary object"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from speckv.decoding.models import encode_prompt
    from speckv.pipeline.lossless import check_prompt, describe, failures, summary

    if not args.draft and not args.demo:
        raise SpecKVError("choose a draft with --draft PATH")
    if args.max_new_tokens < 1:
        raise SpecKVError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise SpecKVError(f"--batch must be at least 1, got {args.batch}")
    # Fixed γ unless asked otherwise: the check is about the verifier, not about the policy.
    spec = decoder_spec(args, controller=None if args.controller or args.gamma else "fixed:4")
    items = prompt_items(args)
    decoders = build_decoders(spec)
    target = decoders.target
    checks = []
    prompts = [encode_prompt(target.tokenizer, text, raw=args.raw) for _, text in items]
    batched = [None] * len(prompts)
    if args.batch > 1:  # the speculative side decoded as the server decodes concurrent requests
        from speckv.decoding.batch import generate_together

        batched = generate_together(decoders, prompts, args.max_new_tokens, args.batch)
    for (item_id, _), prompt_ids, speculative in zip(items, prompts, batched, strict=True):
        check = check_prompt(decoders, prompt_ids, args.max_new_tokens, item_id, speculative)
        checks.append(check)
        print(json.dumps(check.to_dict()) if args.json else describe(check), flush=True)
    how = f", {args.batch} at a time in one pass" if args.batch > 1 else ""
    line = summary(
        checks, f"{target.precision} (compute {target.compute_dtype}), {decoders.controller.describe()}{how}"
    )
    if args.json:
        print(json.dumps({"summary": line, "lossless": all(c.lossless for c in checks)}))
    else:
        print(line)
    problems = failures(checks)
    for problem in problems:
        print(f"speckv: check-lossless: {problem}", file=sys.stderr)
    return 1 if problems else 0
