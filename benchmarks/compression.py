"""Speed and fidelity of each target compression level on this machine.

    python benchmarks/compression.py [--levels fp32,bf16,fp16,int8,nf4] [--tokens 64]

For each level: target-only greedy decoding speed (batch 1, KV cache, our engine) relative to
fp32, and agreement = share of positions where the level's greedy next token equals fp32's,
teacher-forced along fp32's own greedy continuations of the held-out prompts. Writes its table
into benchmarks/RESULTS.md (section `compression`).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from speckv import datasets
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import encode_prompt, load_model
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads

BACKENDS = {
    "fp32": "plain dtype",
    "bf16": "plain dtype",
    "fp16": "plain dtype",
    "int8": "torchao Int8WeightOnlyConfig (CPU) / bitsandbytes LLM.int8 (CUDA)",
    "nf4": "bitsandbytes 4-bit NF4",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="fp32,bf16,fp16,int8,nf4")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: speckv's rule, docs/engine.md)"
    )
    parser.add_argument("--fp32-head", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    levels = args.levels.split(",")
    if levels[0] != "fp32":
        levels = ["fp32", *[level for level in levels if level != "fp32"]]

    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)
    items = datasets.load_prompts("mixed", split="heldout", per_task=args.per_task)
    reference = load_model("demo", "fp32")
    prompts = [encode_prompt(reference.tokenizer, item.text) for item in items]
    reference_runs = [SpeculativeDecoder(reference).generate(p, args.tokens).token_ids for p in prompts]
    reference_choice = [
        _teacher_forced_argmax(reference, p, run) for p, run in zip(prompts, reference_runs, strict=True)
    ]
    del reference

    rows = []
    for level in levels:
        model = load_model("demo", level, fp32_head=args.fp32_head)
        decoder = SpeculativeDecoder(model)
        decoder.generate(prompts[0][:16], 4)  # warm-up
        speeds = []
        for _ in range(args.repeats):
            tokens = seconds = 0.0
            for prompt in prompts:
                result = decoder.generate(prompt, args.tokens)
                tokens += len(result.token_ids)
                seconds += result.total_time_s
            speeds.append(tokens / seconds)
        agree = total = 0
        for prompt, run, expected in zip(prompts, reference_runs, reference_choice, strict=True):
            choice = _teacher_forced_argmax(model, prompt, run)
            agree += int((choice == expected).sum())
            total += len(expected)
        rows.append((model.precision, statistics.median(speeds), agree / total))
        print(f"{level}: {rows[-1][1]:.1f} tokens/s, agreement {rows[-1][2]:.3f}", file=sys.stderr)
        del model, decoder

    base = rows[0][1]
    lines = [
        "| level | library | tokens/s (median) | speed vs fp32 | greedy agreement with fp32 |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {lvl} | {BACKENDS[lvl.partition('+')[0]]} | {tps:.1f} | {tps / base:.2f}× | {agr:.3f} |"
        for lvl, tps, agr in rows
    ]
    body = (
        f"### Compression levels of the demo target on this CPU\n\n{len(prompts)} held-out prompts, "
        f"{args.tokens} tokens, batch 1, median of {args.repeats}.\n\n" + "\n".join(lines) + "\n"
    )
    print(write_section("compression", body, level=",".join(row[0] for row in rows)))


def _teacher_forced_argmax(loaded, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The model's greedy next token at each continuation position, given the reference prefix."""
    ids = torch.tensor([prompt + continuation[:-1]], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(ids, logits_to_keep=len(continuation)).logits[0]
    return logits.argmax(-1).cpu()


if __name__ == "__main__":
    main()
