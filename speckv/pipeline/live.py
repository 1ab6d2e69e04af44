"""Live runs of `speckv evaluate`: the same prompts decoded with the same policies, target-only and
Hugging Face assisted generation with the same draft, on the wall clock
(speckv.pipeline.compare.compare), beside the replay's modelled tokens/s: the cost model's error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from speckv.controllers import make_controller
from speckv.costs import CostModel
from speckv.decoding.drafters import Drafter
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.pipeline.compare import Method, compare, hf_assisted_methods
from speckv.pipeline.replay import Trace, replay, target_only
from speckv.pipeline.scoring import TARGET_ONLY, policy_name


def live_methods(specs: list[str], hf_gammas: tuple[int, ...]) -> list[Method]:
    """Our engine with each policy, target-only, and HF assisted generation with the same draft."""
    methods = [Method(TARGET_ONLY)] + [Method(policy_name(spec), controller=spec) for spec in specs]
    return methods + hf_assisted_methods(hf_gammas)


def live_evaluation(
    target: LoadedModel,
    draft: Drafter | LoadedModel,
    traces: list[Trace],
    prompts: list[list[int]],
    specs: list[str],
    cost: CostModel,
    repeats: int = 3,
    hf_gammas: tuple[int, ...] = (2, 3, 4, 5, 6),
    progress: bool = True,
    assistant: LoadedModel | None = None,
) -> pd.DataFrame:
    """Measured tokens/s (median over repeats) beside the replay's modelled ones, per method. HF
    assisted rows run `assistant` (default: `draft` if it is a model; none: no HF assisted rows)."""
    max_new = {t.max_new_tokens for t in traces}
    if len(max_new) != 1:
        raise SpecKVError("the traces were recorded with different max_new_tokens")
    assistant = assistant or (draft if isinstance(draft, LoadedModel) else None)
    methods = live_methods(specs, hf_gammas if assistant is not None else ())
    # Adaptive policies are capped at the profile's γ_max, so replay can follow every live run.
    gamma_max = min(t.gamma_max for t in traces)
    results = compare(
        target, draft, prompts, methods, max_new.pop(), repeats, progress, gamma_max, assistant=assistant
    )
    reference = results[0].outputs
    rows = []
    for method, result in zip(methods, results, strict=True):
        modelled = np.nan
        if not method.hf:
            if method.controller is None:
                runs = [target_only(trace, cost) for trace in traces]
            else:
                controller = make_controller(
                    method.controller, gamma_max=gamma_max, compression=cost.compression
                )
                runs = [replay(trace, controller, cost) for trace in traces]
            modelled = sum(r.tokens for r in runs) / sum(r.time_s for r in runs)
        measured = result.median_tokens_per_s
        rows.append(
            {
                "compression": target.compression,
                "method": method.name,
                "engine": "transformers" if method.hf else "speckv",
                "measured_tokens_per_s": measured,
                "runs": ", ".join(f"{x:.2f}" for x in result.tokens_per_s),
                "modelled_tokens_per_s": modelled,
                "model_error_pct": 100 * (modelled / measured - 1),
                "acceptance": result.accepted / result.drafted if result.drafted else np.nan,
                "mean_accepted": result.mean_accepted if result.drafted else np.nan,
                "same_output": result.outputs == reference,
                "prompts": len(prompts),
                "repeats": repeats,
            }
        )
    return pd.DataFrame(rows)
