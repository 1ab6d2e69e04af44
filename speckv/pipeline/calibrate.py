"""`speckv calibrate`: measure the cost model (`speckv.costs.CostModel`) on this machine.

`calibrate` measures it by running the engine itself with fixed γ = 0..γ_max and taking medians of the times it records per step, so the model
describes exactly the loop that `speckv generate` runs.
"""

from __future__ import annotations

import statistics

from speckv.controllers import FixedController
from speckv.costs import CostModel
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.records import GenerationResult
from speckv.util.progress import progress_bar


def calibrate(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[list[int]],
    gamma_max: int = 8,
    new_tokens: int = 48,
    repeats: int = 2,
    progress: bool = True,
) -> CostModel:
    """Measure the cost model of `target` (at its compression) with `draft` by running the engine."""
    if not prompts:
        raise SpecKVError("calibration needs at least one prompt")
    if new_tokens < 2 * gamma_max + 2:  # so that a second step can still draft γ_max tokens
        raise SpecKVError(
            f"calibrate with at least {2 * gamma_max + 2} new tokens per run (γ_max {gamma_max})"
        )
    decoders = [SpeculativeDecoder(target, eos_token_ids=())] + [
        SpeculativeDecoder(target, draft, FixedController(gamma), eos_token_ids=())
        for gamma in range(1, gamma_max + 1)
    ]
    for decoder in decoders:  # first calls pay one-off allocations
        decoder.generate(prompts[0][:8], 4)
    runs: list[tuple[int, GenerationResult]] = []
    bar = progress_bar(total=repeats * len(prompts) * len(decoders), desc="calibrate", show=progress)
    for _ in range(repeats):
        for prompt in prompts:  # interleaved: drift hits every γ alike
            for decoder in decoders:
                runs.append((len(prompt), decoder.generate(prompt, new_tokens)))
                bar.update()
    bar.close()
    return cost_model_from_runs(target.compression, runs, gamma_max)


def cost_model_from_runs(
    compression: str, runs: list[tuple[int, GenerationResult]], gamma_max: int
) -> CostModel:
    """Medians of the engine's per-step timings; step 0 (which reads the prompt) gives the prefill."""
    verify: dict[int, list[float]] = {k: [] for k in range(1, gamma_max + 2)}
    draft_per_token, step_overhead, target_prefill, draft_prefill = [], [], [], []
    for _, result in runs:
        for step in result.steps[1:]:
            verify[step.gamma + 1].append(step.verify_time_s)
            if step.drafted:
                draft_per_token.append(step.draft_time_s / step.drafted)
        inside = sum(s.draft_time_s + s.verify_time_s + s.controller_time_s for s in result.steps)
        step_overhead.append((result.total_time_s - inside) / len(result.steps))
    missing = [k for k, times in verify.items() if not times]
    if missing or not draft_per_token:
        raise SpecKVError(f"calibration runs have no steps verifying {missing} tokens; use more new tokens")
    # Medians as measured, dips included: on CPUs a pass over more tokens can be cheaper (MKL
    # switches GEMM kernels: 3 tokens cost more than 4 on the demo CPU), which decides which γ pays.
    t_verify = [statistics.median(verify[k]) for k in range(1, gamma_max + 2)]
    t_draft = statistics.median(draft_per_token)
    for prompt_len, result in runs:
        first = result.steps[0]
        target_prefill.append(max(first.verify_time_s - t_verify[first.gamma], 0.0) / prompt_len)
        if first.drafted:
            draft_prefill.append(max(first.draft_time_s - first.drafted * t_draft, 0.0) / prompt_len)
    return CostModel(
        compression=compression,
        t_draft_s=t_draft,
        t_verify_s=[float(t) for t in t_verify],
        t_step_s=max(statistics.median(step_overhead), 0.0),
        target_prefill_s_per_token=statistics.median(target_prefill),
        draft_prefill_s_per_token=statistics.median(draft_prefill) if draft_prefill else 0.0,
    )
