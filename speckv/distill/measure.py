"""Checks of a saved draft as `load_draft` returns it: held-out agreement and decode cost.

Run at the end of `speckv distill` on the re-loaded draft (bf16 weights, restricted head), so the
numbers in its manifest are those of the files, not of the fp32 draft still in memory.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from speckv.decoding.cache import CachedModel


@torch.no_grad()
def loaded_agreement(draft, heldout_records: list[dict]) -> dict:
    """Held-out agreement of a draft as `load_draft` returns it (bf16 weights, restricted head).

    Per task, the share of response positions where the draft's argmax, teacher-forced along the
    target's continuation, is the target's argmax; "overall" is the mean of the tasks."""
    hits: Counter = Counter()
    totals: Counter = Counter()
    vocab_map = draft.vocab_map
    for record in heldout_records:
        response = record["response"].long()
        ids = torch.cat([record["prompt"].long(), response[:-1]])[None].to(draft.device)
        logits = draft.model(input_ids=ids).logits[0, len(record["prompt"]) - 1 :]
        guess = logits.argmax(-1).cpu()
        if vocab_map is not None:
            guess = vocab_map.cpu()[guess]
        hits[record["task"]] += int((guess == record["top_idx"][:, 0].long()).sum())
        totals[record["task"]] += len(response)
    result = {task: hits[task] / totals[task] for task in sorted(totals)}
    result["overall"] = sum(result[t] for t in totals) / len(totals)
    return result


def decode_cost(loaded, prompt_ids: list[int], tokens: int = 32) -> float:
    """Seconds per decoded token at batch 1 with a KV cache (greedy, after the prompt)."""
    model = CachedModel(loaded)
    logits = model.feed(prompt_ids, keep=1).logits
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(logits[0, -1].argmax())
        logits = model.feed([token], keep=1).logits
    return (time.perf_counter() - start) / tokens


def cost_ratio(draft, target, prompt_ids: list[int], rounds: int = 5) -> tuple[float, float, float]:
    """(target s/token, draft s/token, ratio): alternating runs, the fastest of each, so a busy
    machine slows both alike as far as possible. `draft`: a draft model or a feature drafter."""
    from speckv.decoding.drafters.feature import FeatureDrafter

    target_costs, draft_costs = [], []
    for _ in range(rounds):
        target_costs.append(decode_cost(target, prompt_ids))
        if isinstance(draft, FeatureDrafter):
            draft_costs.append(head_decode_cost(draft, target, prompt_ids))
        else:
            draft_costs.append(decode_cost(draft, prompt_ids))
    target_cost, draft_cost = min(target_costs), min(draft_costs)
    return target_cost, draft_cost, draft_cost / target_cost


@torch.no_grad()
def loaded_head_agreement(drafter, records: list[dict]) -> dict:
    """`feature_training.head_agreement` of a feature head as `load_feature_drafter` returns it
    (its precision, its vocabulary): per task gamma1 / top4 / gamma2, then "overall"."""
    from speckv.distill.draft_model import vocab_lookup
    from speckv.distill.feature_training import head_agreement, make_feature_examples

    lookup = vocab_lookup(drafter.vocab_map, drafter.target_vocab_size)
    return head_agreement(drafter.head, make_feature_examples(records, lookup))


def head_decode_cost(drafter, target, prompt_ids: list[int], tokens: int = 32) -> float:
    """Seconds per token a feature drafter spends drafting a chain of `tokens` after `prompt_ids`
    (the target's features of the prompt given, as after its first pass)."""
    from speckv.decoding.verify import SamplingConfig

    out = CachedModel(target).feed(prompt_ids, hidden_states=True)
    features = torch.stack([out.hidden_states[i][0] for i in drafter.target_hidden_layers], 1)
    drafter.begin()
    drafter.features = features[:-1].to(drafter.head.fuse.weight.dtype)  # all but the last token's
    start = time.perf_counter()
    count = sum(1 for _ in drafter.draft(list(prompt_ids), tokens, SamplingConfig(), None))
    elapsed = (time.perf_counter() - start) / max(1, count)
    drafter.begin()
    return elapsed
