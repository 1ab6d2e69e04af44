"""The cost model of one decoding step on this hardware, per target compression level.

A step that drafts γ tokens costs γ·t_draft + t_verify(γ + 1) + t_step: γ one-token draft
passes (with their signals), one target pass over the γ + 1 unseen tokens with verification and
cache cropping, and the loop's own bookkeeping. The prompt is paid once, per prompt token, by
the target and (when drafting) by the draft. `calibrate` measures all of it by running the engine
itself with fixed γ = 0..γ_max and taking medians of the times it records per step, so the model
describes exactly the loop that `speckv generate` runs.
"""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from speckv.controllers import FixedController
from speckv.decoding.engine import GenerationResult, SpeculativeDecoder
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.util.files import atomic_write_text

_FILE_FORMAT = "speckv-cost-model"
_FILE_VERSION = 1


@dataclass
class CostModel:
    """Seconds per step for one compression level; `t_verify_s[k - 1]` is a k-token target pass."""

    compression: str
    t_draft_s: float
    t_verify_s: list[float]
    t_step_s: float = 0.0
    target_prefill_s_per_token: float = 0.0
    draft_prefill_s_per_token: float = 0.0

    def __post_init__(self):
        if len(self.t_verify_s) < 1 or min(self.t_verify_s) < 0 or self.t_draft_s < 0:
            raise SpecKVError(f"cost model for {self.compression}: times must be non-negative")

    @property
    def gamma_max(self) -> int:
        return len(self.t_verify_s) - 1

    def step_times(self) -> np.ndarray:
        """Seconds of a step drafting γ tokens, indexed by γ = 0..gamma_max."""
        gammas = np.arange(self.gamma_max + 1)
        return gammas * self.t_draft_s + np.asarray(self.t_verify_s) + self.t_step_s

    def prefill_time(self, prompt_len: int, speculative: bool) -> float:
        """The one-off cost of reading the prompt (the draft reads it too when it drafts)."""
        per_token = self.target_prefill_s_per_token + (self.draft_prefill_s_per_token if speculative else 0.0)
        return prompt_len * per_token


def save_costs(models: dict[str, CostModel], path: str | Path, meta: dict | None = None) -> None:
    document = costs_to_dict(models, {**environment(), **(meta or {})})
    atomic_write_text(path, json.dumps(document, indent=1))


def load_costs(path: str | Path) -> dict[str, CostModel]:
    """Cost models by compression level from a file written by `save_costs` (or `speckv calibrate`)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SpecKVError(f"cannot read cost model {path}: {error}") from error
    return costs_from_dict(document, str(path))


def costs_from_dict(document: dict, where: str) -> dict[str, CostModel]:
    if document.get("format") != _FILE_FORMAT or document.get("version") != _FILE_VERSION:
        raise SpecKVError(f"{where} is not a version-{_FILE_VERSION} SpecKV cost model")
    return {name: CostModel(**fields) for name, fields in document["levels"].items()}


def costs_to_dict(models: dict[str, CostModel], meta: dict | None = None) -> dict:
    return {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "meta": meta or {},
        "levels": {name: asdict(model) for name, model in models.items()},
    }


def environment() -> dict:
    """Where the numbers were measured: they hold for this machine and thread count only."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


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
    bar = tqdm(total=repeats * len(prompts) * len(decoders), desc="calibrate", disable=not progress)
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
