"""`speckv generate`: decode prompts with speculative decoding or the target alone."""

from __future__ import annotations

import sys

from speckv.cli.options import SPLIT_HELP, SPLITS
from speckv.errors import SpecKVError


def register(sub) -> None:
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
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from speckv.controllers import check_gamma, make_controller
    from speckv.decoding.draft_files import load_draft
    from speckv.decoding.engine import SpeculativeDecoder
    from speckv.decoding.models import encode_prompt, load_model
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
