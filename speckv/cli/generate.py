"""`speckv generate`: decode prompts with speculative decoding or the target alone."""

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
        "generate",
        help="generate text with speculative decoding (or the target alone)",
        description="Generate with speculative decoding. Greedy output equals the target's own; "
        "sampled output follows the target's distribution.",
    )
    add_model_options(parser)
    add_policy_options(parser)
    add_costs_option(parser)
    add_prompt_options(parser)
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--max-new-tokens", type=int, default=128)
    decoding.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)"
    )
    decoding.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min-p × the top one's (0 = off)"
    )
    decoding.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt with the step records"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    import json
    import math

    from speckv.decoding.models import encode_prompt
    from speckv.decoding.verify import SamplingConfig

    spec = decoder_spec(args)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SpecKVError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {args.temperature}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise SpecKVError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise SpecKVError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    items = prompt_items(args)
    sampling = SamplingConfig(args.temperature, args.top_p, args.seed, args.top_k, args.min_p)
    sampling.check()  # before any model loads

    factory = build_decoders(spec)
    target = factory.target
    encoded = [(item_id, encode_prompt(target.tokenizer, text, raw=args.raw)) for item_id, text in items]
    for item_id, prompt_ids in encoded:  # every prompt fits, before any decoding starts
        try:
            factory.check_context(len(prompt_ids), args.max_new_tokens)
        except SpecKVError as error:
            raise SpecKVError(f"{item_id}: {error}" if len(encoded) > 1 else str(error)) from None
    decoder = factory.new(sampling)  # one for all prompts: SpecKV's live estimates carry over
    config = factory.describe()
    for item_id, prompt_ids in encoded:
        result = decoder.generate(prompt_ids, args.max_new_tokens)
        output = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        summary = result.summary()
        if args.json:
            record = {
                "id": item_id,
                "text": output,
                "prompt_ids": result.prompt_ids,
                "token_ids": result.token_ids,
                "summary": summary,
                "config": {
                    **config,
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "top_k": args.top_k,
                    "min_p": args.min_p,
                    "max_new_tokens": args.max_new_tokens,
                },
                "steps": [step.to_dict() for step in result.steps],
            }
            print(json.dumps(record))
        else:
            if len(items) > 1:
                print(f"== {item_id}")
            print(output)
            print(_summary_line(summary, f"{target.name} {target.precision}", config), file=sys.stderr)
    return 0


def _summary_line(summary: dict, target: str, config: dict) -> str:
    how = f"draft {config['draft']}, {config['controller']}" if config["draft"] else "target only"
    return (
        f"[{summary['new_tokens']} tokens, {summary['steps']} steps, "
        f"mean accepted {summary['mean_accepted']:.2f}, acceptance {summary['acceptance_rate']:.1%}, "
        f"mean gamma {summary['mean_gamma']:.2f}, first token {1e3 * summary['time_to_first_token_s']:.0f} ms, "
        f"then {summary['decode_tokens_per_s']:.1f} tokens/s | target {target}, {how}]"
    )
