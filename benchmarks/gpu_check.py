"""GPU readiness: losslessness, cost curves and speed of every level on a CUDA machine, one report.

    python benchmarks/gpu_check.py                         # CUDA: demo pair, fp16,bf16,int8,nf4
    python benchmarks/gpu_check.py --levels fp16,nf4 --prompts 8 --out gpu.md
    python benchmarks/gpu_check.py --dry-run               # CPU, tiny random models: the same code path

Per level: `speckv check-lossless`'s check on the paper prompts (every divergence must be a
near-tie; int8 and nf4 through bitsandbytes on CUDA), the target's forward time by tokens per
pass, and the demo pair's speed table (our engine target-only and speculative, transformers'
generate). A level that fails to load or run is reported, not fatal. Writes one markdown report
(default benchmarks/gpu_check.md; the dry run writes to a temporary directory unless --out) and
exits 1 if any level is not lossless or failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from speckv.cli.options import split_list
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import LoadedModel, check_compression, encode_prompt, load_model
from speckv.pipeline.compare import Method, compare, speedup_table
from speckv.pipeline.lossless import NEAR_TIE_ULPS, PromptCheck, check_prompt, describe, failures
from speckv.util.benchmark_header import default_command, format_header, run_info
from speckv.util.threads import configure_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_cost import cost_table  # noqa: E402  (a sibling script)

DEFAULT_OUT = Path(__file__).parent / "gpu_check.md"


def tiny_pair(directory: Path) -> tuple[str, str, list[list[int]]]:
    """A random Llama target, a draft close to it, both saved as HF directories, and prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 128
    words = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="w2"
    )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(10.0)  # random init is near-uniform; a sharper target drafts better
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
        paths.append(str(directory / name))
    prompts = [[5, 9, 17], list(range(2, 20)), [40, 41, 7, 7]]
    return paths[0], paths[1], prompts


def check_level(
    level: str, target_source: str, draft_source: str, device: str, prompts, args
) -> tuple[list[str], dict]:
    """The report section of one level and its summary row."""
    row = {"level": level, "precision": level, "lossless": "failed", "differ": "–", "divergences": "–"}
    lines = [f"## {level}", ""]
    try:
        check_compression(level, torch.device(device))
        started = time.perf_counter()
        target = load_model(target_source, level, device, args.fp32_head)
        draft = load_draft(draft_source, target)
        row["precision"] = target.precision
        encoded = [p if isinstance(p, list) else encode_prompt(target.tokenizer, p) for p in prompts]
        lines += _lossless_section(target, draft, encoded, args, row)
        lines += _cost_section(target, args, row)
        lines += _speed_section(target, draft, encoded, args, row)
        lines.append(f"Level done in {time.perf_counter() - started:.0f} s.\n")
        del target, draft
    except Exception as error:  # one level's failure must not lose the others' results
        lines += [
            f"**Failed:** `{type(error).__name__}: {error}`",
            "",
            "```",
            traceback.format_exc(limit=4),
            "```",
            "",
        ]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return lines, row


def _lossless_section(target: LoadedModel, draft: LoadedModel, prompts, args, row: dict) -> list[str]:
    # The shipped cost curve: the check is about the verifier, and the lent GPU time is short.
    decoders = DecoderSpec(target, draft, args.controller, costs="shipped").build(progress=False)
    checks: list[PromptCheck] = [
        check_prompt(decoders, p, args.max_new_tokens, f"prompt {i}") for i, p in enumerate(prompts)
    ]
    divergences = [d for c in checks for d in c.divergences]
    worst = max((d.margin / d.tolerance for d in divergences), default=0.0)
    row |= {
        "lossless": "yes" if all(c.lossless for c in checks) else "**NO**",
        "differ": f"{sum(c.first_difference is not None for c in checks)}/{len(checks)}",
        "divergences": f"{len(divergences)} (worst margin {worst:.2f}× tolerance)",
    }
    lines = [
        f"### Lossless check ({args.controller}, {args.max_new_tokens} new tokens, compute dtype "
        f"{target.compute_dtype}, tolerance {NEAR_TIE_ULPS} ulp of the top logit)",
        "",
    ]
    lines += [f"- {describe(c)}" for c in checks]
    lines += [f"- **not lossless:** {line}" for line in failures(checks)]
    return [*lines, ""]


def _cost_section(target: LoadedModel, args, row: dict) -> list[str]:
    ks = [int(k) for k in split_list(args.ks)]
    table = cost_table(target.model, ks, [None], args.repeats, label="threads")
    first, last = (float(x) for x in (table[2].split("|")[2], table[2].split("|")[-2]))
    row["cost"] = f"{first:.1f} ms, {last / first:.2f}× at k={ks[-1]}"
    return ["### Target forward time (ms) by tokens per pass (200-token cache)", "", *table, ""]


def _speed_section(target: LoadedModel, draft: LoadedModel, prompts, args, row: dict) -> list[str]:
    methods = [Method("target only (speckv)"), Method("target only (HF generate)", hf=True)]
    methods += [Method(f"speckv fixed γ={g}", controller=f"fixed:{g}") for g in (2, 3, 4, 6)]
    methods += [
        Method("speckv heuristic", controller="heuristic"),
        Method("HF assisted (defaults)", hf=True, hf_assistant={}),
    ]
    results = compare(
        target,
        draft,
        prompts[: args.speed_prompts],
        methods,
        args.max_new_tokens,
        args.speed_repeats,
        progress=False,
    )
    best = max(results[2:], key=lambda r: r.median_tokens_per_s)
    row["speed"] = f"{best.method.name}: {best.median_tokens_per_s / results[0].median_tokens_per_s:.2f}×"
    return [
        f"### Speed ({len(prompts[: args.speed_prompts])} prompts, median of {args.speed_repeats})",
        "",
        speedup_table(results),
        "",
    ]


def versions() -> str:
    """The libraries the levels load through (the suite header gives the machine and torch)."""
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # reported as absent; the nf4/int8 levels then say why they failed
        bnb = "absent"
    return f"transformers {transformers.__version__}, bitsandbytes {bnb}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random models, tiny report")
    parser.add_argument(
        "--levels", help="comma-separated (default fp16,bf16,int8,nf4; dry run fp32,bf16,fp16)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=16, help="paper prompts for the lossless check")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--controller", default="fixed:4")
    parser.add_argument("--fp32-head", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    parser.add_argument("--out", help=f"report path (default {DEFAULT_OUT}; dry run: a temporary file)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    configure_threads(args.threads, quiet=args.dry_run)
    scratch = tempfile.TemporaryDirectory(prefix="speckv-gpu-check-")
    if args.dry_run:
        args.device = "cpu"
        levels = split_list(args.levels or "fp32,bf16,fp16")
        target, draft, prompts = tiny_pair(Path(scratch.name))
        args.max_new_tokens, args.ks, args.repeats = min(args.max_new_tokens, 12), "1,2,4", 3
        args.speed_prompts, args.speed_repeats = 2, 1
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="speckv-gpu-check-")) / "report.md"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; --dry-run runs the same code on CPU", file=sys.stderr)
            return 2
        from speckv.datasets import load_prompts

        levels = split_list(args.levels or "fp16,bf16,int8,nf4")
        target, draft = "demo", "demo"
        prompts = [item.text for item in load_prompts("paper")][: args.prompts]
        out = Path(args.out) if args.out else DEFAULT_OUT

    started = time.time()
    sections, rows = [], []
    for level in levels:
        print(f"gpu_check: {level}…", file=sys.stderr)
        lines, row = check_level(level, target, draft, args.device, prompts, args)
        sections += lines
        rows.append(row)
    columns = ["level", "precision", "lossless", "differ", "divergences", "cost", "speed"]
    summary = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    summary += ["| " + " | ".join(str(r.get(c, "–")) for c in columns) + " |" for r in rows]
    command = default_command([str(Path(__file__)), *(sys.argv[1:] if argv is None else argv)])
    header = [
        f"# GPU readiness check{' (dry run: CPU, tiny random models)' if args.dry_run else ''}",
        "",
        format_header(run_info(level=",".join(levels), command=command)),
        "",
        f"Device {args.device}; {versions()}; {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
        f"{time.time() - started:.0f} s.",
        "",
        "cost: forward time at k=1 and its ratio at the largest k; speed: the fastest speculative row "
        "against our target-only loop.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *summary, "", *sections]))
    print(f"gpu_check: report in {out}", file=sys.stderr)
    print("\n".join(summary))
    scratch.cleanup()
    return 0 if all(r["lossless"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
