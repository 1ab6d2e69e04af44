"""`min_new_tokens`: no stop token before the n-th new token, in greedy and sampled decoding,
chains and trees; the speculative output stays the target's own under the same rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SMALL_VOCAB, chi_square_p, exact_first_two, loaded, tiny_model
from test_engine import reference_greedy

from speckv.controllers import make_controller
from speckv.decoding.drafters import ModelTreeDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.verify import SamplingConfig, warp_probs
from speckv.errors import SpecKVError

PROMPT = [4, 6, 8]


def reference_held_back(model, prompt: list[int], max_new: int, stops: set[int], min_new: int) -> list[int]:
    """Greedy decoding by full forward passes, with the stop tokens' logits at -inf for the first
    `min_new` new tokens: independent of the engine's masking."""
    tokens = list(prompt)
    with torch.no_grad():
        for index in range(max_new):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            if index < min_new:
                logits[sorted(stops)] = float("-inf")
            tokens.append(int(logits.argmax()))
            if tokens[-1] in stops:
                break
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def early_stops(tiny_target) -> tuple[set[int], int]:
    """Two stop ids of the target's free greedy run, the first at new token 3 or later."""
    free = reference_greedy(tiny_target.model, PROMPT, 40)
    first = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    second = next(t for t in free[first + 1 :] if t not in free[: first + 1])
    return {free[first], second}, first


def drafters(tiny_drafts):
    yield None, None
    for name in ("identical", "close"):
        yield tiny_drafts[name], "fixed:3"
        yield tiny_drafts[name], "fixed:8"
        yield ModelTreeDrafter(tiny_drafts[name]), "tree:6"


def test_greedy_holds_stops_back_and_stays_the_targets_output(tiny_target, tiny_drafts, early_stops):
    stops, first_stop = early_stops
    for min_new in (first_stop, first_stop + 1, first_stop + 6):
        expected = reference_held_back(tiny_target.model, PROMPT, 40, stops, min_new)
        # New token `first_stop` may already be a stop when min_new = first_stop (the free run's
        # end); past that the rule changes the output.
        assert (len(expected) > first_stop + 1) == (min_new > first_stop)
        assert not stops.intersection(expected[:min_new])
        for draft, spec in drafters(tiny_drafts):
            controller = make_controller(spec) if spec else None
            decoder = SpeculativeDecoder(tiny_target, draft, controller, eos_token_ids=stops)
            result = decoder.generate(PROMPT, 40, min_new_tokens=min_new)
            assert result.token_ids == expected, (spec, min_new)
    # Without the rule, the same decoders stop at the first stop id.
    result = SpeculativeDecoder(tiny_target, eos_token_ids=stops).generate(PROMPT, 40)
    assert len(result.token_ids) == first_stop + 1 and result.stop_reason == "eos"


def test_identical_draft_proposes_a_held_back_stop_and_it_is_rejected(tiny_target, tiny_drafts, early_stops):
    stops, first_stop = early_stops
    decoder = SpeculativeDecoder(
        tiny_target, tiny_drafts["identical"], make_controller("fixed:8"), None, stops
    )
    result = decoder.generate(PROMPT, 20, min_new_tokens=first_stop + 1)
    # The draft's own argmax is the stop token: the step that drafted it did not accept it.
    assert any(s.accepted < s.gamma for s in result.steps)
    assert result.token_ids == reference_held_back(tiny_target.model, PROMPT, 20, stops, first_stop + 1)


def exact_first_two_held(
    model, prompt: list[int], config: SamplingConfig, stop: int, min_new: int
) -> np.ndarray:
    """P(t1, t2) when `stop` cannot be new token 0 (min_new ≥ 1) or 1 (min_new ≥ 2), by enumeration."""
    with torch.no_grad():
        first_logits = model(torch.tensor([prompt])).logits[0, -1]
        if min_new >= 1:
            first_logits[stop] = float("-inf")
        first = warp_probs(first_logits, config)
        joint = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
        for t1 in range(SMALL_VOCAB):
            logits = model(torch.tensor([prompt + [t1]])).logits[0, -1]
            if min_new >= 2:
                logits[stop] = float("-inf")
            joint[t1] = (first[t1] * warp_probs(logits, config)).numpy()
    return joint


@pytest.mark.parametrize("spec", ["fixed:2", "tree:4"])
def test_sampling_with_min_tokens_follows_the_held_back_distribution(spec):
    """min_new_tokens 1 with stop id 0: the first token never is 0, the second follows the plain
    target. Seeded chi-square at α = 0.001, as the other sampling tests; the unheld distribution
    fails it (power check: 11% of the first token's mass is the stop token)."""
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-draft")
    config = SamplingConfig(1.0, top_k=4)
    drafter = ModelTreeDrafter(draft, top_k=2) if spec.startswith("tree") else draft
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    for seed in range(1200):
        decoder = SpeculativeDecoder(target, drafter, make_controller(spec), replace(config, seed=seed), [0])
        tokens = decoder.generate([3, 1], 3, min_new_tokens=1).token_ids
        counts[tokens[0], tokens[1]] += 1
    assert chi_square_p(counts, exact_first_two_held(target.model, [3, 1], config, 0, 1)) > 1e-3
    assert chi_square_p(counts, exact_first_two(target.model, [3, 1], config)) < 1e-3
    # Held back for two tokens, neither of the first two is ever the stop token.
    for seed in range(40):
        decoder = SpeculativeDecoder(target, drafter, make_controller(spec), replace(config, seed=seed), [0])
        tokens = decoder.generate([3, 1], 6, min_new_tokens=2).token_ids
        assert 0 not in tokens[:2] and len(tokens) >= 3


def test_min_new_tokens_errors(tiny_target):
    decoder = SpeculativeDecoder(tiny_target)
    with pytest.raises(SpecKVError, match="min_new_tokens must be at least 0"):
        decoder.generate([1, 2], 5, min_new_tokens=-1)
    every_token = SpeculativeDecoder(tiny_target, eos_token_ids=range(tiny_target.model.config.vocab_size))
    with pytest.raises(SpecKVError, match="not a stop token"):
        every_token.generate([1, 2], 5, min_new_tokens=1)
