"""The speculative loop is lossless: greedy output equals the target's, sampling follows its distribution."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    SMALL_VOCAB,
    PrefixController,
    assert_cache_is_fresh,
    chi_square_p,
    exact_first_two,
    loaded,
    tiny_model,
)

from speckv.controllers import make_controller
from speckv.decoding.drafters import ModelDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError

CONTROLLERS = [f"fixed:{g}" for g in range(1, 9)] + ["heuristic", "heuristic:1", "confidence:0.5"]
PROMPTS = [[5], [7, 3, 9, 11, 2], list(range(2, 32))]


def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by full forward passes, no cache: independent of the engine."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
    return tokens[len(prompt) :]


@pytest.mark.parametrize("draft_name", ["identical", "close", "unrelated"])
@pytest.mark.parametrize("spec", CONTROLLERS)
def test_greedy_speculative_equals_target_greedy(tiny_target, tiny_drafts, draft_name, spec):
    for prompt in PROMPTS:
        expected = reference_greedy(tiny_target.model, prompt, 23, eos=None)
        decoder = SpeculativeDecoder(
            tiny_target, tiny_drafts[draft_name], make_controller(spec), eos_token_ids=()
        )
        result = decoder.generate(prompt, max_new_tokens=23)
        assert result.token_ids == expected
        assert sum(s.tokens_produced for s in result.steps) == 23
        for step in result.steps:
            assert 0 <= step.accepted <= step.gamma <= step.gamma_budget
            assert len(step.draft_entropy) == step.gamma


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 1.5])
def test_verifying_a_prefix_of_the_drafts_stays_lossless(tiny_target, tiny_drafts, threshold):
    controller = PrefixController(budget=4, threshold=threshold)
    decoder = SpeculativeDecoder(tiny_target, tiny_drafts["close"], controller, eos_token_ids=())
    for prompt in PROMPTS:
        result = decoder.generate(prompt, max_new_tokens=23)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 23)
        for step in result.steps:
            assert 0 <= step.accepted <= step.gamma <= step.drafted == len(step.draft_confidence)
            assert step.drafted == min(4, 23 - 1 - sum(s.tokens_produced for s in result.steps[: step.step]))
        verified = sum(s.gamma for s in result.steps)
        if threshold == 0.0:
            assert verified == sum(s.drafted for s in result.steps)
        if threshold > 1:
            assert verified == 0 and all(s.tokens_produced == 1 for s in result.steps)
    # Sampling never asks (dropping a token for its own probability would bias the output).
    sampler = PrefixController(budget=4, threshold=1.5)
    sampled = SpeculativeDecoder(
        tiny_target, tiny_drafts["close"], sampler, SamplingConfig(temperature=1.0, seed=0), eos_token_ids=()
    ).generate(PROMPTS[1], 10)
    assert sampler.asked == 0 and all(s.gamma == s.drafted for s in sampled.steps)


def test_greedy_ignores_the_sampling_filters(tiny_target, tiny_drafts):
    """top_k, top_p and min_p never drop the most likely token, so greedy decoding is unchanged."""
    config = SamplingConfig(0.0, top_p=0.1, top_k=2, min_p=0.9)
    for draft in (None, tiny_drafts["close"]):
        controller = make_controller("fixed:3") if draft else None
        decoder = SpeculativeDecoder(tiny_target, draft, controller, config, eos_token_ids=())
        assert decoder.generate(PROMPTS[1], 15).token_ids == reference_greedy(
            tiny_target.model, PROMPTS[1], 15
        )


def test_target_only_equals_reference(tiny_target):
    for prompt in PROMPTS:
        result = SpeculativeDecoder(tiny_target, eos_token_ids=()).generate(prompt, max_new_tokens=17)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 17)
        assert all(s.gamma == 0 and s.tokens_produced == 1 for s in result.steps)


def test_identical_draft_accepts_everything(tiny_target, tiny_drafts):
    decoder = SpeculativeDecoder(
        tiny_target, tiny_drafts["identical"], make_controller("fixed:4"), eos_token_ids=()
    )
    result = decoder.generate([3, 4, 5], max_new_tokens=20)
    # 20 tokens in steps of 4 accepted + 1 bonus: 4 full steps of 5.
    assert [s.tokens_produced for s in result.steps] == [5, 5, 5, 5]
    assert result.summary()["acceptance_rate"] == 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 6, 7, 13])
@pytest.mark.parametrize("spec", ["fixed:3", "fixed:8", "heuristic"])
def test_length_limit_inside_a_step(tiny_target, tiny_drafts, max_new_tokens, spec):
    decoder = SpeculativeDecoder(
        tiny_target, tiny_drafts["identical"], make_controller(spec), eos_token_ids=()
    )
    result = decoder.generate([9, 8, 7], max_new_tokens=max_new_tokens)
    assert result.token_ids == reference_greedy(tiny_target.model, [9, 8, 7], max_new_tokens)
    assert result.stop_reason == "length"


@pytest.mark.parametrize("draft_name", ["identical", "close", "unrelated"])
def test_eos_inside_a_draft(tiny_target, tiny_drafts, draft_name):
    prompt = [4, 6, 8]
    free_run = reference_greedy(tiny_target.model, prompt, 40)
    # An EOS id that first appears a few tokens in: the identical draft proposes it mid-step.
    eos = next(t for i, t in enumerate(free_run) if i >= 3 and t not in free_run[:i])
    expected = free_run[: free_run.index(eos) + 1]
    for spec in ("fixed:2", "fixed:5", "fixed:8", "confidence:0.3"):
        decoder = SpeculativeDecoder(
            tiny_target, tiny_drafts[draft_name], make_controller(spec), eos_token_ids=[eos]
        )
        result = decoder.generate(prompt, max_new_tokens=40)
        assert result.token_ids == expected
        assert result.stop_reason == "eos"


def test_cache_rollback_matches_fresh_forward(tiny_target, tiny_drafts):
    """After every step, including rejections, both caches equal a fresh pass over the kept tokens."""
    decoder = SpeculativeDecoder(
        tiny_target, tiny_drafts["close"], make_controller("fixed:5"), eos_token_ids=()
    )
    prompt = [2, 3, 5, 7]
    tokens = list(prompt)
    rejections = 0
    for record, new_tokens in decoder.stream(prompt, max_new_tokens=40):
        tokens.extend(new_tokens)
        rejections += record.accepted < record.gamma
        for cached_model in (decoder.verifier.model, decoder.drafter.model):
            assert_cache_is_fresh(cached_model, tokens)
    assert rejections >= 3


# --- sampling -----------------------------------------------------------------------------------


def sampled_first_two(target, draft, spec, config: SamplingConfig, runs: int) -> np.ndarray:
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    for seed in range(runs):
        seeded = replace(config, seed=seed)
        controller = make_controller(spec) if draft else None
        result = SpeculativeDecoder(target, draft, controller, seeded, eos_token_ids=()).generate([3, 1], 3)
        counts[result.token_ids[0], result.token_ids[1]] += 1
    return counts


@pytest.fixture(scope="module")
def small_pair():
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-draft")
    return target, draft


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        (SamplingConfig(1.0), "fixed:2"),
        (SamplingConfig(0.7, top_p=0.8), "fixed:3"),
        (SamplingConfig(1.0, top_k=3), "fixed:2"),  # top-k 3 of 5 removes 30% of the mass here
        (SamplingConfig(0.9, min_p=0.3), "fixed:3"),
    ],
)
def test_speculative_sampling_follows_target_distribution(small_pair, config, spec):
    """Seeds are fixed, so the test is deterministic; with fresh seeds its false-failure rate is 0.1%
    (it fails when p < 0.001). The draft's own distribution fails the same test (power check), and
    so does the target's distribution without the filters (they do change it)."""
    target, draft = small_pair
    exact = exact_first_two(target.model, [3, 1], config)
    counts = sampled_first_two(target, draft, spec, config, runs=1200)
    assert chi_square_p(counts, exact) > 1e-3
    draft_counts = sampled_first_two(draft, None, None, config, runs=1200)
    assert chi_square_p(draft_counts, exact) < 1e-3
    unfiltered = SamplingConfig(config.temperature)
    if config != unfiltered:
        assert chi_square_p(counts, exact_first_two(target.model, [3, 1], unfiltered)) < 1e-3


def test_sampling_is_reproducible_with_a_seed(small_pair):
    target, draft = small_pair
    config = SamplingConfig(1.0, seed=123)
    runs = [
        SpeculativeDecoder(target, draft, make_controller("fixed:3"), config).generate([1, 2], 20)
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids


# --- bad input ----------------------------------------------------------------------------------


def test_bad_engine_input(tiny_target, tiny_drafts):
    decoder = SpeculativeDecoder(tiny_target, tiny_drafts["close"], make_controller("fixed:2"))
    with pytest.raises(SpecKVError, match="prompt is empty"):
        decoder.generate([], 5)
    with pytest.raises(SpecKVError, match="max_new_tokens must be at least 1"):
        decoder.generate([1, 2], 0)
    with pytest.raises(SpecKVError, match="needs a controller"):
        SpeculativeDecoder(tiny_target, tiny_drafts["close"])
    with pytest.raises(SpecKVError, match="temperature"):
        SpeculativeDecoder(tiny_target, sampling=SamplingConfig(temperature=-1.0))


def test_the_verify_pass_hands_the_target_hidden_states_to_a_drafter(tiny_target, tiny_drafts):
    """A feature drafter names target layers; it gets their states for every fed position."""

    class FeatureReader(ModelDrafter):
        target_hidden_layers = (0, 2)

        def begin(self):
            super().begin()
            self.seen = []

        def rollback(self, kept, verdict):
            super().rollback(kept, verdict)
            self.seen.append(verdict.hidden_states)

    drafter = FeatureReader(tiny_drafts["close"], tiny_target.model.config.vocab_size)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller("fixed:3"), eos_token_ids=())
    prompt = [4, 5, 6]
    result = decoder.generate(prompt, 10)
    tokens = prompt + result.token_ids
    with torch.no_grad():
        fresh = tiny_target.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    fed = 0
    for step, states in zip(result.steps, drafter.seen, strict=True):
        assert len(states) == 2
        width = (len(prompt) if step.step == 0 else 1) + step.gamma  # unseen tokens + the draft
        assert states[0].shape == (width, tiny_target.model.config.hidden_size)
        kept = width - step.gamma + step.accepted  # positions of the sequence among them
        for layer, state in zip((0, 2), states, strict=True):
            torch.testing.assert_close(state[:kept], fresh[layer][0, fed : fed + kept], rtol=1e-4, atol=1e-5)
        fed += kept
