"""The cost model of the machine SpecKV runs on, measured where it runs.

A cost curve says what a target pass over k tokens and a drafted token cost, and that depends on
the CPU (AVX2 or AVX-512, native bf16 or not), the GPU, the thread count and the compression level:
a curve from another machine plans for a machine the controller is not on. So on first use of a
(target, draft, level, device, threads) combination `local_costs("auto", …)` measures the curve
(`measure_costs`: seconds on the demo pair) and caches it under the SpecKV cache folder; later
runs reuse it. `speckv calibrate --quick` does the same by hand (and re-measures); `--costs
shipped` plans with the controller file's fallback curve, `--costs FILE` with a file of
`speckv calibrate`. A drafter that only copies (n-gram candidates) has no draft model: its curve
is the target's passes alone, its drafting free.

`measure_costs` times the engine's own parts, not a model call beside them: the target verifier's
pass over k tokens with its verification and cache rollback, and the draft model's drafter, at
each width interleaved (so drift hits every width alike), medians of several.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers

from speckv.costs import CostModel, device_description, load_costs, save_costs
from speckv.decoding.drafters import ModelDrafter, Verdict
from speckv.decoding.models import LoadedModel
from speckv.decoding.target import TargetVerifier
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.util.paths import cache_dir
from speckv.util.progress import progress_bar

log = logging.getLogger(__name__)

COSTS_HELP = (
    "cost curve the SpecKV controller plans with: auto (measured on this machine on first use of the "
    "pair, level and thread count, then cached), shipped (the controller file's fallback, measured "
    "elsewhere), or a cost file of `speckv calibrate` (default auto)"
)
# A fixed, ordinary prompt: step costs depend on its length (the cache the pass attends to), not its text.
_PROMPT = (
    "Explain, step by step, how a hash table handles collisions, and write a short Python class that "
    "implements one with separate chaining. Then summarise the trade-offs against open addressing."
)


# A curve whose passes vary more than this between rounds (median over widths of the median
# absolute deviation over the median) was measured on a busy machine: on a quiet 2-core VM it is a
# few %, with another process sharing the cores it is tens of %, with widths out of order.
UNSTEADY = 0.1
MEASURE_TRIES = 3


@dataclass
class MeasuredCosts:
    """A measured curve and how much its passes varied between rounds (`UNSTEADY`)."""

    cost: CostModel
    unsteadiness: float


@dataclass
class CostChoice:
    """The curve a controller plans with; `cost` None = the controller file's fallback."""

    cost: CostModel | None
    source: str  # for tables and logs: "measured now (14 s)", "cached (PATH)", "shipped", "file PATH"


def measure_costs(
    target: LoadedModel,
    draft: LoadedModel | None,
    gamma_max: int = 8,
    repeats: int = 7,
    context_tokens: int = 128,
    progress: bool = True,
) -> MeasuredCosts:
    """The cost model of `target` (at its compression) with `draft`, measured now.

    t_verify(k): the verifier's pass over k tokens after a `context_tokens`-token sequence, rolled
    back each time; t_draft: the draft's time per token over chains of γ_max; prefill: the
    verifier's and the drafter's first pass over the sequence, per token. `draft` None: copies
    only, which cost no draft pass (t_draft 0)."""
    if gamma_max < 1 or repeats < 1:
        raise SpecKVError("measure costs with gamma_max ≥ 1 and repeats ≥ 1")
    ids = target.tokenizer(_PROMPT)["input_ids"]
    prompt = (ids * (context_tokens // max(len(ids), 1) + 1))[:context_tokens]
    greedy = SamplingConfig()
    verifier = TargetVerifier(target, greedy)
    drafter = ModelDrafter(draft, target.model.config.vocab_size) if draft is not None else None
    verifier.begin(len(prompt))
    started = time.perf_counter()
    verifier.verify(prompt, [], [], [], None)
    target_prefill = (time.perf_counter() - started) / len(prompt)
    verifier.rollback(len(prompt))
    draft_prefill = 0.0
    if drafter is not None:
        drafter.begin()
        started = time.perf_counter()
        next(iter(drafter.draft(prompt, 1, greedy, None)))
        draft_prefill = (time.perf_counter() - started) / len(prompt)
        drafter.rollback(len(prompt), Verdict([], 0))

    context = [*prompt, prompt[-1]]  # one unseen token, as in every step after the first
    chain = prompt[: gamma_max + 1]
    verify: dict[int, list[float]] = {k: [] for k in range(1, gamma_max + 2)}
    per_token: list[float] = []
    bar = progress_bar(total=repeats + 1, desc="measuring this machine's costs", show=progress, leave=False)
    for repeat in range(repeats + 1):  # the first round warms every width up and is not kept
        for k in range(1, gamma_max + 2):
            drafted = chain[: k - 1]
            started = time.perf_counter()
            verifier.verify(context, drafted, list(range(-1, k - 2)), [], None)
            verifier.rollback(len(prompt))
            if repeat:
                verify[k].append(time.perf_counter() - started)
        if drafter is not None:
            started = time.perf_counter()
            proposals = sum(1 for _ in drafter.draft(context, gamma_max, greedy, None))
            drafter.rollback(len(prompt), Verdict([], 0))
            if repeat:
                per_token.append((time.perf_counter() - started) / proposals)
        bar.update()
    bar.close()
    cost = CostModel(
        compression=target.compression,
        t_draft_s=statistics.median(per_token) if per_token else 0.0,
        t_verify_s=[statistics.median(verify[k]) for k in range(1, gamma_max + 2)],
        target_prefill_s_per_token=target_prefill,
        draft_prefill_s_per_token=draft_prefill,
    )
    timed = [*verify.values(), per_token] if per_token else [*verify.values()]
    return MeasuredCosts(cost, unsteadiness(timed))


def unsteadiness(samples: list[list[float]]) -> float:
    """Median, over the timed parts, of their samples' median absolute deviation over their median."""
    spreads = []
    for times in samples:
        middle = statistics.median(times)
        spreads.append(statistics.median(abs(t - middle) for t in times) / middle if middle > 0 else 0.0)
    return statistics.median(spreads)


def measure_pass_costs(
    target: LoadedModel,
    widths: int,
    rows: tuple[int, ...] = (2, 4, 8),
    repeats: int = 5,
    context_tokens: int = 128,
    progress: bool = True,
) -> dict[int, list[float]]:
    """A batch's target pass, measured now: for each number of sequences in `rows`, the pass over
    that many rows of one `SlotStore` (each holding a `context_tokens`-token sequence) feeding k =
    1..`widths` tokens each, rolled back each time; widths interleaved, medians of `repeats`."""
    from speckv.decoding.cache import Feed
    from speckv.decoding.slots import SlotStore

    if widths < 1 or repeats < 1 or any(r < 1 for r in rows):
        raise SpecKVError("measure batch passes with widths ≥ 1, repeats ≥ 1 and rows ≥ 1")
    ids = target.tokenizer(_PROMPT)["input_ids"]
    prompt = (ids * (context_tokens // max(len(ids), 1) + 1))[:context_tokens]
    times: dict[int, list[float]] = {}
    bar = progress_bar(
        total=len(rows) * (repeats + 1),
        desc="measuring this machine's batch passes",
        show=progress,
        leave=False,
    )
    for count in sorted(set(rows)):
        store = SlotStore(target)
        slots = [store.acquire() for _ in range(count)]
        for slot in slots:
            slot.feed(prompt)  # alone: one row at a time
        samples: dict[int, list[float]] = {k: [] for k in range(1, widths + 1)}
        for repeat in range(repeats + 1):  # the first round warms every width up and is not kept
            for k in range(1, widths + 1):
                started = time.perf_counter()
                store.forward({slot.row: Feed(prompt[:k], keep=k) for slot in slots})
                if repeat:
                    samples[k].append(time.perf_counter() - started)
                for slot in slots:
                    slot.crop(len(prompt))
            bar.update()
        times[count] = [statistics.median(samples[k]) for k in range(1, widths + 1)]
        for slot in slots:
            slot.release()
    bar.close()
    return times


def cache_key(target: LoadedModel, draft: LoadedModel | None, device: str, threads: int) -> dict:
    """What a cached curve holds for: the models (name and configuration), the level, the device
    (CPU model and flags, or GPU name), the thread count, and the versions of torch and
    transformers (either may change the kernels a pass runs). Not where the models were loaded
    from: a second checkout or copy of the same models reuses the curve."""

    def model_id(loaded: LoadedModel) -> str:
        config = loaded.model.config.to_dict()
        # Where the files were loaded from does not matter; the transformers version is a field of
        # the key itself, so the key says why a curve was measured again.
        for varies in ("_name_or_path", "transformers_version"):
            config.pop(varies, None)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        return f"{loaded.name}:{digest[:12]}"

    return {
        "target": model_id(target),
        "draft": model_id(draft) if draft is not None else "none (copies only)",
        "precision": target.precision,
        "device": device_description(device),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "costs" / f"{key['precision']}-{key['threads']}t-{digest}.json"


def local_costs(
    choice: str,
    target: LoadedModel,
    draft: LoadedModel | None,
    gamma_max: int = 8,
    remeasure: bool = False,
    progress: bool = True,
    batch_rows: tuple[int, ...] = (),
) -> CostChoice:
    """The cost curve for `--costs CHOICE`: auto (cached, else measured now and cached), shipped,
    or a cost file. `remeasure` measures even when a cached curve exists. Under auto, `batch_rows`
    (the server's batch sizes) adds the batch's pass over that many sequences (`t_pass_s`),
    measured once and cached beside the curve. `draft` None: a drafter that only copies."""
    if choice == "shipped":
        return CostChoice(None, "shipped (the controller file's, measured elsewhere)")
    if choice != "auto":
        costs = load_costs(choice)
        if target.compression not in costs:
            raise SpecKVError(f"cost file {choice} has no {target.compression} level ({', '.join(costs)})")
        return CostChoice(costs[target.compression], f"file {choice}")
    device = str(target.device)
    key = cache_key(target, draft, device, torch.get_num_threads())
    path = cache_path(key)
    log.debug("cost curve cache for %s: %s", key, path)
    if path.exists() and not remeasure:
        try:
            cached = load_costs(path)[target.compression]
            if cached.gamma_max >= gamma_max:
                return _with_batch_passes(
                    CostChoice(cached, f"cached ({path})"), target, batch_rows, path, key, progress
                )
            log.debug(
                "cached curve stops at width %d, %d wanted: measuring again", cached.gamma_max, gamma_max
            )
        except (SpecKVError, KeyError) as error:
            log.debug("cached curve unusable (%s): measuring again", error)
    started = time.perf_counter()
    # A curve measured while another process shares the cores is slow, erratic and out of order;
    # cached, it would misplan every later run. Measure again (the steadiest try is kept), and
    # cache only a steady one.
    tries = []
    while len(tries) < MEASURE_TRIES and (not tries or tries[-1].unsteadiness > UNSTEADY):
        tries.append(measure_costs(target, draft, gamma_max, progress=progress))
    best = min(tries, key=lambda measured: measured.unsteadiness)
    seconds = time.perf_counter() - started
    if best.unsteadiness > UNSTEADY:
        log.warning(
            "this machine was busy while its costs were measured (passes varied by ±%.0f%% in %d tries): "
            "planning with that curve for now, not caching it; `speckv calibrate --quick` measures again",
            100 * best.unsteadiness,
            len(tries),
        )
        source = f"measured now, busy machine (±{100 * best.unsteadiness:.0f}%, {seconds:.0f} s; not cached)"
        return _with_batch_passes(CostChoice(best.cost, source), target, batch_rows, None, key, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_costs({target.compression: best.cost}, path, {"key": key})
    chosen = CostChoice(best.cost, f"measured now ({seconds:.0f} s; cached in {path})")
    return _with_batch_passes(chosen, target, batch_rows, path, key, progress)


def _with_batch_passes(
    chosen: CostChoice,
    target: LoadedModel,
    rows: tuple[int, ...],
    path: Path | None,
    key: dict,
    progress: bool,
) -> CostChoice:
    """`chosen`, with the batch passes over `rows` sequences measured now if missing (and cached
    in `path`, unless None)."""
    missing = tuple(r for r in rows if r > 1 and r not in chosen.cost.t_pass_s)
    if not missing:
        return chosen
    started = time.perf_counter()
    widths = len(chosen.cost.t_verify_s)
    measured = measure_pass_costs(target, widths, missing, progress=progress)
    cost = replace(chosen.cost, t_pass_s={**chosen.cost.t_pass_s, **measured})
    if path is not None:
        save_costs({target.compression: cost}, path, {"key": key})
    seconds = time.perf_counter() - started
    sizes = ", ".join(map(str, missing))
    return CostChoice(
        cost, f"{chosen.source}; batch passes over {sizes} sequences measured now ({seconds:.0f} s)"
    )


def give_costs(
    controller,
    choice: str,
    target: LoadedModel,
    drafter,
    progress: bool = True,
    batch_rows: tuple[int, ...] = (),
) -> str | None:
    """Give a SpecKV controller the curve `--costs CHOICE` names (measuring it if need be, with the
    batch passes over `batch_rows` sequences for a server); returns where the curve came from, or
    None for a controller that plans without costs. A drafter that drafts without a draft model
    to time (a feature head) keeps the file's fallback under `auto`; one that only copies (n-gram
    candidates) drafts for free and takes the target's measured curve."""
    from speckv.controllers.speckv import SpecKVController

    if not isinstance(controller, SpecKVController):
        return None
    draft = getattr(drafter, "loaded", None)
    if choice == "auto" and draft is None and not getattr(drafter, "copies_only", False):
        controller.cost_source = "shipped (the drafter has no draft model to time)"
        return controller.cost_source
    widths = max(controller.models.gamma_max, controller.models.costs[target.compression].gamma_max)
    chosen = local_costs(choice, target, draft, widths, progress=progress, batch_rows=batch_rows)
    if chosen.cost is None:
        controller.cost_source = chosen.source
    else:
        controller.use_costs(chosen.cost, chosen.source)
    return chosen.source
