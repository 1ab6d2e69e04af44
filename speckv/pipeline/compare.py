"""Side-by-side wall-clock comparison of decoding methods on one model pair.

Every method decodes the same prompts in the same run, interleaved prompt by prompt so that
machine drift hits all methods alike; each repeat gives one tokens/s per method (total tokens
over total time) and the table reports the median over repeats; `paired_speedup` states one row
against others with a bootstrap interval over prompts and repeats. Methods are our engine with
any controller (or target-only), and Hugging Face `generate`, alone, assisted by the same draft,
or assisted with a SpecKV controller deciding the draft lengths (`speckv.integrations.hf`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speckv.decoding.builder import DecoderSpec
from speckv.decoding.drafters import Drafter
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.integrations.hf import SpecKVAssisted, hf_assistant
from speckv.records import StepRecord
from speckv.util.progress import progress_bar
from speckv.util.stats import rate_over_best


@dataclass(frozen=True)
class Method:
    """`controller` None with `hf` False is our target-only loop; `hf` uses transformers' generate,
    with `hf_assistant` settings of the assistant's generation config for assisted generation
    (None: the target alone), or with `hf_controller` (a controller spec) through SpecKV's
    `custom_generate` (`speckv.integrations.hf`)."""

    name: str
    controller: str | None = None
    drafter: str | None = None  # e.g. "ngram"; None: the pair's draft model (trees for tree:N)
    hf: bool = False
    hf_assistant: dict | None = None
    hf_controller: str | None = None
    costs: str = "auto"  # a SpecKV row's cost curve: auto (this machine's), shipped or a file
    follow_costs: bool = True  # a SpecKV row follows the measured step times (off: plans as given)


@dataclass
class MethodResult:
    method: Method
    new_tokens: int = 0
    steps: int = 0
    accepted: int = 0
    drafted: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # first repeat, per prompt
    verified: list[int] = field(default_factory=list)  # first repeat: nodes verified per drafting step
    cost_source: str | None = None  # where a SpecKV row's cost curve came from
    # Every repeat's (tokens, seconds) per prompt: what `paired_speedup` resamples.
    timings: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> list[float]:
        """One per repeat: its tokens over its seconds."""
        return [sum(n for n, _ in run) / sum(s for _, s in run) for run in self.timings]

    @property
    def median_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def pooled_tokens_per_s(self) -> float:
        """Every repeat's tokens over every repeat's seconds."""
        return sum(n for run in self.timings for n, _ in run) / sum(s for run in self.timings for _, s in run)

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    def width_shares(self) -> str:
        """How many tokens the drafting steps verified, as shares: "1: 45%  3: 38%" ('none')."""
        counts = Counter(self.verified)
        total = sum(counts.values())
        return "  ".join(f"{n}: {counts[n] / total:.0%}" for n in sorted(counts)) or "none"


def paired_speedup(ours: MethodResult, others: list[MethodResult], confidence: float = 0.9) -> str:
    """`ours`' tokens/s over the fastest of `others`, every prompt and repeat pooled, as
    "1.23× (90% CI 1.10–1.31)": a paired bootstrap over prompts and repeats that chooses the
    fastest of `others` again in each resample (`speckv.util.stats.rate_over_best`)."""
    rows = [ours, *others]
    tokens = [[[n for n, _ in run] for run in r.timings] for r in rows]
    seconds = [[[s for _, s in run] for run in r.timings] for r in rows]
    try:  # ragged timings (rows timed on other prompts or repeats) do not make an array either
        speedup = rate_over_best(tokens, seconds, confidence=confidence)
    except ValueError:
        raise SpecKVError("a paired speed-up needs rows timed on the same prompts and repeats") from None
    return f"{speedup.estimate:.2f}× ({confidence:.0%} CI {speedup.low:.2f}–{speedup.high:.2f})"


def speedup_summary(results: list[MethodResult], name: str, baseline: str = "target only (speckv)") -> str:
    """Row `name` against `baseline` and against the fastest row that is not a SpecKV controller's,
    each a pooled ratio with its paired bootstrap interval (`paired_speedup`)."""
    by_name = {r.method.name: r for r in results}
    others = [r for r in results if not _speckv_row(r.method)]
    best = max(others, key=lambda r: r.pooled_tokens_per_s)
    return (
        f"{name}: {paired_speedup(by_name[name], [by_name[baseline]])} the target alone, "
        f"{paired_speedup(by_name[name], others)} the fastest other row (pooled: {best.method.name})"
    )


def _speckv_row(method: Method) -> bool:
    return method.controller == "speckv" or (method.hf_controller or "").startswith("speckv")


def hf_assisted_methods(gammas: tuple[int, ...]) -> list[Method]:
    """HF assisted generation: its defaults, its heuristic schedule, and constant γ without threshold."""
    return [
        Method("HF assisted (defaults)", hf=True, hf_assistant={}),
        Method(
            "HF assisted (heuristic)",
            hf=True,
            hf_assistant={"num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic"},
        ),
    ] + [
        Method(
            f"HF assisted (γ={g})",
            hf=True,
            hf_assistant={
                "num_assistant_tokens": g,
                "num_assistant_tokens_schedule": "constant",
                "assistant_confidence_threshold": 0.0,
            },
        )
        for g in gammas
    ]


def compare(
    target: LoadedModel,
    draft: Drafter | LoadedModel | None,
    prompts: list[list[int]],
    methods: list[Method],
    max_new_tokens: int,
    repeats: int = 3,
    progress: bool = True,
    gamma_max: int = 20,
    assistant: LoadedModel | None = None,
) -> list[MethodResult]:
    """Run every method on every prompt `repeats` times; the first pass is preceded by a warm-up.
    Each pass starts every method from a fresh state (a stateful controller carries what it learns
    from prompt to prompt within a pass, never from an earlier pass over the same prompts).
    `gamma_max` caps the budget of our adaptive controllers. `draft` is the pair's drafter (a
    draft model, or a drafter such as a feature head); HF assisted rows run `assistant`, by
    default `draft` when it is a model. SpecKV rows get their cost curve (`Method.costs`, measured
    on this machine on first use) before any timing."""
    if assistant is None and isinstance(draft, LoadedModel):
        assistant = draft
    fresh_runners, results = {}, {}
    for m in methods:
        fresh_runners[m.name], cost_source = _runner(
            m, target, draft, assistant, max_new_tokens, gamma_max, progress
        )
        results[m.name] = MethodResult(m, cost_source=cost_source)
    for fresh in fresh_runners.values():  # first calls pay one-off costs (allocations, lazy inits)
        fresh()(prompts[0][:16])
    bar = progress_bar(
        total=repeats * len(prompts) * len(methods), desc="benchmark", show=progress, leave=False
    )
    for repeat in range(repeats):
        runners = {name: fresh() for name, fresh in fresh_runners.items()}
        for result in results.values():
            result.timings.append([])
        for prompt in prompts:
            for name, runner in runners.items():
                started = time.perf_counter()
                tokens, stats = runner(prompt)
                elapsed = time.perf_counter() - started
                result = results[name]
                result.timings[-1].append((len(tokens), elapsed))
                if repeat == 0:
                    result.outputs.append(tokens)
                    result.new_tokens += len(tokens)
                    result.steps += stats.get("steps", 0)
                    result.accepted += stats.get("accepted", 0)
                    result.drafted += stats.get("drafted", 0)
                    result.verified += stats.get("verified", [])
                bar.update()
    bar.close()
    return list(results.values())


def _runner(
    method: Method,
    target: LoadedModel,
    draft: Drafter | LoadedModel | None,
    assistant: LoadedModel | None,
    max_new_tokens: int,
    gamma_max: int,
    progress: bool = True,
) -> tuple[Callable[[], Callable[[list[int]], tuple[list[int], dict]]], str | None]:
    """A maker of the method's run(prompt) -> (tokens, stats), each made from a fresh state, and
    where a SpecKV row's cost curve came from."""
    if method.hf:
        return _hf_runner(method, target, assistant, max_new_tokens, gamma_max, progress)
    spec = DecoderSpec(
        target,
        draft=(method.drafter or draft) if method.controller else None,
        controller=method.controller,
        gamma_max=gamma_max,
        costs=method.costs,
        target_only=not method.controller,
    )
    decoders = spec.build(progress)
    if decoders.cost_source is not None:
        decoders.controller.follow_costs = method.follow_costs

    def fresh():
        decoder = decoders.new()

        def run(prompt: list[int]) -> tuple[list[int], dict]:
            result = decoder.generate(prompt, max_new_tokens)
            return result.token_ids, _stats(result.steps)

        return run

    return fresh, decoders.cost_source


def _stats(steps: list[StepRecord]) -> dict:
    return {
        "steps": len(steps),
        "accepted": sum(s.accepted for s in steps),
        "drafted": sum(s.gamma for s in steps),
        "verified": [s.gamma for s in steps if s.drafted],
    }


def _hf_runner(
    method: Method,
    target: LoadedModel,
    assistant: LoadedModel | None,
    max_new_tokens: int,
    gamma_max: int,
    progress: bool,
) -> tuple[Callable[[], Callable[[list[int]], tuple[list[int], dict]]], str | None]:
    """transformers' `generate`: alone, assisted by `assistant` with the method's settings (its
    heuristic schedule, which transformers keeps in the assistant's config, fresh each pass), or
    assisted with a SpecKV controller (its cost curve measured here, before any timing)."""
    if method.hf_assistant is None and method.hf_controller is None:
        return (lambda: lambda prompt: (_hf_generate(target, prompt, max_new_tokens), {})), None
    if assistant is None:
        raise SpecKVError("HF assisted generation needs a draft model (it cannot run a feature head)")
    if method.hf_controller is None:
        wrapped = hf_assistant(assistant)

        def fresh_assisted():
            model = _configured(wrapped, method.hf_assistant)
            return lambda prompt: (_hf_generate(target, prompt, max_new_tokens, assistant_model=model), {})

        return fresh_assisted, None
    assisted = SpecKVAssisted(
        assistant, method.hf_controller, costs=method.costs, gamma_max=gamma_max, progress=progress
    )
    prototype = assisted.prepare(target)
    if assisted.cost_source is not None:
        prototype.follow_costs = method.follow_costs

    def fresh_speckv():
        assisted.controller = copy.deepcopy(prototype)  # `prepare` keeps it for this target

        def run(prompt: list[int]) -> tuple[list[int], dict]:
            tokens = _hf_generate(target, prompt, max_new_tokens, custom_generate=assisted)
            return tokens, _stats(assisted.steps)

        return run

    return fresh_speckv, assisted.cost_source


def _configured(assistant, settings: dict):
    """`assistant` with a generation config of its own, updated with `settings`: transformers reads
    an assistant's schedule (`num_assistant_tokens`, its schedule, the confidence threshold) from
    the assistant's config, not from `generate`'s arguments, and a heuristic schedule keeps its
    state there from one call to the next. A shallow copy: the weights are shared."""
    configured = copy.copy(assistant)
    configured.generation_config = copy.deepcopy(assistant.generation_config)
    configured.generation_config.update(**settings)
    return configured


def _hf_generate(target: LoadedModel, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    input_ids = torch.tensor([prompt], device=target.device)
    with torch.inference_mode():
        output = target.model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(input_ids),
            **kwargs,
        )
    return output[0, len(prompt) :].tolist()


def speedup_table(results: list[MethodResult], baseline: str = "target only (speckv)") -> str:
    """Median tokens/s, speed-up over `baseline`, acceptance, and whether output matches the baseline."""
    reference = next(r for r in results if r.method.name == baseline)
    lines = [
        "| method | tokens/s (median) | runs | speed-up | mean accepted / step | acceptance | same output |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        runs = ", ".join(f"{x:.1f}" for x in r.tokens_per_s)
        accepted = f"{r.mean_accepted:.2f}" if r.steps and r.drafted else "–"
        acceptance = f"{r.accepted / r.drafted:.1%}" if r.drafted else "–"
        same = "yes" if r.outputs == reference.outputs else "NO"
        lines.append(
            f"| {r.method.name} | {r.median_tokens_per_s:.1f} | {runs} | "
            f"{r.median_tokens_per_s / reference.median_tokens_per_s:.2f}× | {accepted} | {acceptance} | {same} |"
        )
    return "\n".join(lines)


def write_results_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
