"""Drafts from earlier requests: the n-gram drafter with and without the other requests' text.

    python benchmarks/suffix_drafts.py                  # fp32, 1 thread, 20 prompts a workload
    python benchmarks/suffix_drafts.py --per-workload 8 --no-write

Requests to one model are decoded in order, each through its own decoder from one factory, as
the server does, so `suffix` drafters share what the earlier requests wrote and `ngram` drafters
see only their own request. Repeated workloads: one template with different inputs, many in a
row (math word problems under one instruction, code tasks under one instruction, articles under
the summarization set's own instruction, all held-out); the ordinary test split: the four tasks'
test prompts interleaved, so neighbouring requests share little. Greedy, fixed γ, EOS honoured.

Mean accepted tokens per step and the acceptance rate do not depend on timing; tokens/s is a
rough indication only (1 thread on a core other jobs share). Writes `suffix_drafts-<level>` into
benchmarks/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from speckv import datasets
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.models import LoadedModel, encode_prompt, load_model
from speckv.util.benchmark_header import write_section

MATH = "Solve this math word problem step by step, then give the final answer on its own line.\n\nProblem: {}"
CODE = "Complete the following Python function. Reply with the code only.\n\n```python\n{}```"
ORDINARY = "ordinary test split"
# Pairs: the request-local drafter, then the same with earlier requests' text.
PAIRS = (("ngram", "suffix"), ("demo+ngram", "demo+suffix"))


def workloads(per: int) -> dict[str, list[str]]:
    """Prompt texts per workload, in request order."""
    heldout = {task: datasets.load_prompts(task, split="heldout")[:per] for task in ("math", "code")}
    test = {task: datasets.load_prompts(task, split="test") for task in datasets.TASKS}
    return {
        "math, one template": [MATH.format(item.text) for item in heldout["math"]],
        "code, one template": [CODE.format(item.text) for item in heldout["code"]],
        "summarization": [
            item.text for item in datasets.load_prompts("summarization", split="heldout")[:per]
        ],
        ORDINARY: interleave([[item.text for item in items] for items in test.values()])[:per],
    }


def interleave(lists: list[list[str]]) -> list[str]:
    """One item of each list in turn, as long as any has items left."""
    return [items[i] for i in range(max(map(len, lists))) for items in lists if i < len(items)]


@dataclass
class Run:
    steps: int = 0
    accepted: int = 0
    drafted: int = 0
    decode_tokens: int = 0  # after each request's first step, which reads the prompt
    decode_seconds: float = 0.0
    outputs: list[list[int]] | None = None


def run(target: LoadedModel, drafter: str, prompts: list[list[int]], gamma: int, max_new: int) -> Run:
    """Every prompt in order, each through its own decoder of one factory (the server's way)."""
    factory = DecoderSpec(target, draft=drafter, controller=f"fixed:{gamma}").build(progress=False)
    result = Run(outputs=[])
    for prompt in prompts:
        decoded = factory.new().generate(prompt, max_new)
        result.steps += len(decoded.steps)
        result.accepted += sum(s.accepted for s in decoded.steps)
        result.drafted += sum(s.gamma for s in decoded.steps)
        result.decode_tokens += len(decoded.token_ids) - decoded.steps[0].tokens_produced
        result.decode_seconds += decoded.total_time_s - decoded.first_token_s
        result.outputs.append(decoded.token_ids)
    return result


def rows(local: str, shared: str, a: Run, b: Run) -> list[str]:
    same = sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))
    lines = []
    for name, r in ((local, a), (shared, b)):
        change = (
            f"{(b.accepted / b.steps) / (a.accepted / a.steps) - 1:+.1%}" if r is b and a.accepted else "–"
        )
        lines.append(
            f"| {name} | {r.accepted / r.steps:.3f} | {change} | {r.accepted / max(r.drafted, 1):.1%} | "
            f"{r.drafted / r.steps:.2f} | {r.decode_tokens / r.decode_seconds:.1f} | "
            + (f"{same}/{len(a.outputs)} |" if r is b else "– |")
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fp32 by default: every drafter then gets the same greedy output, so their steps compare exactly.
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--per-workload", type=int, default=20, help="prompts per workload")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=4, help="fixed drafting budget per step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-hybrid", action="store_true", help="skip demo+ngram against demo+suffix")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)

    target = load_model("demo", args.compression, "cpu")
    started = time.time()
    pairs = PAIRS[:1] if args.no_hybrid else PAIRS
    sections, totals = [], {pair: [Run(), Run()] for pair in pairs}
    for workload, texts in workloads(args.per_workload).items():
        prompts = [encode_prompt(target.tokenizer, text) for text in texts]
        lines = [
            "| drafter | mean accepted / step | vs request-local | acceptance | drafted / step | "
            "decode tokens/s (1 thread, shared core) | same output as request-local |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for pair in pairs:
            local, shared = (run(target, spec, prompts, args.gamma, args.max_new_tokens) for spec in pair)
            lines += rows(*pair, local, shared)
            if workload != ORDINARY:
                for total, part in zip(totals[pair], (local, shared), strict=True):
                    total.steps, total.accepted = total.steps + part.steps, total.accepted + part.accepted
        sections.append(f"#### {workload} ({len(prompts)} prompts)\n\n" + "\n".join(lines) + "\n")
        print(sections[-1], flush=True)
    pooled = "; ".join(
        f"{shared} {(b.accepted / b.steps) / (a.accepted / a.steps) - 1:+.1%} over {local}"
        for (local, shared), (a, b) in totals.items()
    )
    body = (
        f"### Drafts from earlier requests, demo target {target.precision}\n\n"
        f"Requests decoded in order, greedy, fixed γ={args.gamma}, at most {args.max_new_tokens} new "
        f"tokens, each through its own decoder of one factory (`suffix` shares the earlier requests' "
        f"text, `ngram` sees its own request). Repeated workloads are held-out prompts under one "
        f"template; the ordinary test split interleaves the four tasks. Mean accepted tokens per step "
        f"over the three repeated workloads together: {pooled}. Tokens/s is rough: 1 thread on a core "
        f"other jobs share. Below fp32 a different output is a near-tie of the target's logits "
        f"(docs/engine.md). Run took {time.time() - started:.0f} s.\n\n" + "\n".join(sections)
    )
    print(
        write_section(
            f"suffix_drafts-{target.precision}", body, level=target.precision, write=not args.no_write
        )
    )


if __name__ == "__main__":
    main()
