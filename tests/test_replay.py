"""Replay and the oracle on hand-made traces, with the numbers worked out by hand in comments."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from speckv.controllers import Controller, FixedController, make_controller
from speckv.costs import CostModel
from speckv.errors import SpecKVError
from speckv.pipeline.replay import (
    Trace,
    copy_chains,
    cost_oracle,
    oracle,
    replay,
    run_lengths,
    target_only,
    trace_to_frame,
    traces_from_frame,
)

# t_draft 1, t_verify(k) = 9 + k: a step drafting γ tokens costs 10 + 2γ (no bookkeeping, no prefill).
COST = CostModel("fp32", t_draft_s=1.0, t_verify_s=[10.0, 11.0, 12.0, 13.0])


def signals(i: int) -> tuple[float, float, float]:
    return (float(i), 0.1 * i, 0.1 * i)


def hand_trace(free=None, eos=(), prompt=None) -> Trace:
    """y = 10..15; the draft is wrong only at position 2 (99): L = [2, 1, 0, 3, 2, 1]."""
    return Trace(
        prompt_id="p",
        task="code",
        compression="fp32",
        prompt_len=4,
        max_new_tokens=6,
        gamma_max=3,
        eos_ids=eos,
        tokens=[10, 11, 12, 13, 14, 15],
        draft_tokens=[10, 11, 99, 13, 14, 15],
        signals=[signals(i) for i in range(6)],
        free=free if free is not None else {2: [(20, (7.0, 0.7, 0.7)), (21, (8.0, 0.8, 0.8))]},
        prompt=prompt,
    )


class Scripted(Controller):
    """Budgets from a list; logs every per-token call."""

    def __init__(self, budgets):
        self.budgets, self.seen = list(budgets), []

    def begin_step(self) -> int:
        return self.budgets.pop(0)

    def continue_drafting(self, token_signals) -> bool:
        self.seen.append(token_signals)
        return True


def test_run_lengths():
    assert run_lengths(np.array([1, 1, 0, 1, 1, 1], bool)).tolist() == [2, 1, 0, 3, 2, 1]


@pytest.mark.parametrize(
    ("gamma", "gammas", "accepted", "seconds"),
    [
        # t=0: accept 1, emit 2; t=2: L=0, emit 1; t=3: accept 1, emit 2; t=5: budget 6-5-1 = 0.
        (1, [1, 1, 1, 0], 2, 12 + 12 + 12 + 10),
        # t=0: accept 2, emit 3; t=3: budget min(2, 2), accept 2, emit 3.
        (2, [2, 2], 4, 14 + 14),
        # t=0: drafts 3 (the third is the wrong 99), accepts 2; t=3: budget capped at 2.
        (3, [3, 2], 4, 16 + 14),
    ],
)
def test_fixed_gamma_by_hand(gamma, gammas, accepted, seconds):
    run = replay(hand_trace(), FixedController(gamma), COST)
    assert run.gammas == gammas
    assert run.accepted == accepted
    assert run.tokens == 6 and run.steps == len(gammas)
    assert run.time_s == pytest.approx(seconds)


def test_signals_past_a_mismatch_are_the_free_running_ones():
    controller = Scripted([1, 3, 3])
    run = replay(hand_trace(), controller, COST, keep_records=True)
    # Step 2 starts at t=2 (L=0): the wrong token 99 (teacher-forced signals of position 2), then the
    # draft's own continuation 20, 21; the engine asks after tokens 1 and 2, not after the last.
    second = run.records[1]
    assert second.gamma == 3 and second.accepted == 0 and second.tokens_produced == 1
    assert second.draft_entropy == [2.0, 7.0, 8.0]
    # (step 1 drafted one token: no call; step 3 at t=3 is capped at 2 tokens: one call)
    assert [(s.position, s.entropy) for s in controller.seen] == [(1, 2.0), (2, 7.0), (1, 3.0)]


def test_drafting_stops_at_an_end_of_sequence_token():
    trace = hand_trace(free={2: [(1, (7.0, 0.7, 0.7))]}, eos=(1,))
    run = replay(trace, Scripted([1, 3, 3]), COST)
    assert run.gammas[1] == 2  # 99, then EOS: the draft stops there


def test_policy_beyond_the_recorded_gamma_max_is_an_error():
    with pytest.raises(SpecKVError, match="at most 3"):
        replay(hand_trace(), FixedController(5), COST)


def test_copies_alone_by_hand():
    # Prompt 10 11 12 13. t=0: "13" was never followed, nothing to copy: a plain step (10).
    # t=1: "10" was followed by 11, then 11 12 13: copies 11 12 13 = y[1:4], all accepted, then 14.
    # t=5: "14" never occurred: a plain step. Copies cost no draft pass: 10 + 13 + 10.
    run = replay(
        hand_trace(prompt=[10, 11, 12, 13]), FixedController(3), COST, keep_records=True, drafter="ngram"
    )
    assert run.gammas == [0, 3, 0] and run.accepted == 3
    assert [r.copied for r in run.records] == [0, 3, 0]
    assert run.time_s == pytest.approx(10 + 13 + 10)


def test_model_or_copies_by_hand():
    # Left to itself the drafter copies after a match of 2 or more tokens. t=0: no match, the
    # model's 10 11 99: 2 accepted, then 12 (13 + 3 draft passes). t=3 (budget capped at 6-3-1):
    # "10 11 12" is in the prompt: copies 13, then ("11 12 13" was followed by 10) 10; y[3:] =
    # 13 14 accepts one, then 14 (12, no draft pass). t=5: the last token drafts nothing (10).
    run = replay(
        hand_trace(prompt=[10, 11, 12, 13]),
        FixedController(3),
        COST,
        keep_records=True,
        drafter="model+ngram",
    )
    assert [(r.gamma, r.accepted, r.copied) for r in run.records] == [(3, 2, 0), (2, 1, 2), (0, 0, 0)]
    assert run.time_s == pytest.approx(16 + 12 + 10)


def test_the_draft_prefill_is_paid_only_where_the_model_drafts():
    # Prefill per prompt token: target 0.5, draft 1 (4 prompt tokens). Steps as in the two tests
    # above. The draft model reads the prompt at its first pass, step 0: 3 beyond t_draft's one.
    cost = replace(COST, target_prefill_s_per_token=0.5, draft_prefill_s_per_token=1.0)
    trace = hand_trace(prompt=[10, 11, 12, 13])
    assert replay(trace, FixedController(3), cost, drafter="ngram").time_s == pytest.approx(33 + 2)
    assert replay(trace, FixedController(3), cost, drafter="model+ngram").time_s == pytest.approx(38 + 2 + 3)
    assert replay(trace, Scripted([0] * 6), cost, drafter="model+ngram").time_s == pytest.approx(60 + 2)
    # The oracle with either source may copy alone and skip the draft's prefill: 33 + 2 < 28 + 6.
    assert cost_oracle(trace, replace(cost, t_draft_s=5.0), "model+ngram").time_s == pytest.approx(35)


def test_the_draft_model_pays_for_reading_what_it_has_not_seen():
    # As `test_signals_past_a_mismatch_are_the_free_running_ones`, with a draft's read costing 1 per
    # token beyond the one t_draft includes. t=0: it reads the 4 prompt tokens (3 extra), drafts 10
    # (15 = 1 + 3 + 11). t=2: it reads 10, which it drafted but was not asked past, and the target's
    # 11 (1 extra): 17 = 3 + 1 + 13. t=3: after rolling back to t=2 it reads 12 alone: 14 = 2 + 12.
    cost = replace(COST, draft_prefill_s_per_token=1.0)
    run = replay(hand_trace(), Scripted([1, 3, 3]), cost, keep_records=True)
    assert [r.draft_read for r in run.records] == [4, 2, 1]
    assert run.time_s == pytest.approx(15 + 17 + 14)
    # Plain steps read nothing; the model's first pass, at t=2, reads the prompt and the 2 tokens
    # they emitted (5 extra); it drafts 99 20, none accepted, then 13 14 from t=3 after reading 12.
    run = replay(hand_trace(), Scripted([0, 0, 2, 3]), cost, keep_records=True)
    assert [r.draft_read for r in run.records] == [0, 0, 6, 1]
    assert run.time_s == pytest.approx(10 + 10 + (2 + 5 + 12) + (2 + 12))


def test_copies_need_the_prompt_and_a_known_drafter():
    with pytest.raises(SpecKVError, match="without its prompt"):
        replay(hand_trace(), FixedController(3), COST, drafter="model+ngram")
    with pytest.raises(SpecKVError, match="choose one of"):
        replay(hand_trace(prompt=[1, 2, 3, 4]), FixedController(3), COST, drafter="suffix")


def test_oracle_by_hand():
    # T(5)=10; T(4)=12 (γ=1); T(3)=14 (γ=2); T(2)=24 (γ=0); T(1)=26; T(0)=min(36, 36, 28, 30)=28 (γ=2).
    best = oracle(hand_trace(), COST.step_times())
    assert best.time_s == pytest.approx(28.0)
    assert best.gammas == [2, 2]
    # Tokens per step: at most two steps are needed (3 + 3 tokens), the fewest possible.
    assert oracle(hand_trace(), np.ones(4)).steps == 2
    assert target_only(hand_trace(), COST).time_s == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("t_draft", "times"),
    # Copy chains (prompt 10 11 12 13): none at 0 and 5; at 1 11 12 13 (3 match y), at 2 12 13 10
    # (2 match), at 3 13 10 (1), at 4 10 11 (0). Model steps cost 10 + (1 + t_draft)·γ, copies 10 + γ.
    # t_draft 1, model alone: 28, as above; copies alone: 10 + 13 + 10 (plain, 3 copies, plain);
    # either: the model's 28 again. t_draft 5, model alone: T(4)=16, T(3)=22, T(2)=32, T(1)=38,
    # T(0)=22+T(3)=44; either: T(3)=21 (one copy), T(2)=22 (two copies), T(1)=23 (three copies),
    # T(0)=10+T(1)=33, as the copies alone.
    [
        (1.0, {"model": 28, "ngram": 33, "model+ngram": 28}),
        (5.0, {"model": 44, "ngram": 33, "model+ngram": 33}),
    ],
)
def test_oracle_with_copies_by_hand(t_draft, times):
    cost = CostModel("fp32", t_draft_s=t_draft, t_verify_s=[10.0, 11.0, 12.0, 13.0])
    trace = hand_trace(prompt=[10, 11, 12, 13])
    assert copy_chains(trace, 3) == [[], [11, 12, 13], [12, 13, 10], [13, 10, 11], [10, 11, 12], []]
    for drafter, seconds in times.items():
        assert cost_oracle(trace, cost, drafter).time_s == pytest.approx(seconds)


def brute_force(trace: Trace, step_times: np.ndarray) -> float:
    """The fastest sequence of per-step γ, by trying them all."""
    best = np.inf
    for choices in itertools.product(range(trace.gamma_max + 1), repeat=trace.n_tokens):
        t, total = 0, 0.0
        for gamma in choices:
            if t >= trace.n_tokens:
                break
            gamma = min(gamma, trace.max_new_tokens - t - 1)
            total += step_times[gamma]
            t += min(min(int(trace.run_length[t]), gamma) + 1, trace.n_tokens - t)
        best = min(best, total)
    return best


def random_trace(seed: int, n: int = 7, gamma_max: int = 3, vocab: int = 10) -> Trace:
    """Tokens (and a 5-token prompt) drawn from `vocab` ids: a small vocabulary repeats itself."""
    rng = np.random.default_rng(seed)
    prompt, tokens = rng.integers(10, 10 + vocab, 5).tolist(), rng.integers(10, 10 + vocab, n).tolist()
    draft = [t if rng.random() < 0.6 else 99 for t in tokens]
    free = {m: [(50 + k, signals(k)) for k in range(gamma_max - 1)] for m in range(n) if draft[m] == 99}
    return Trace(
        "r",
        "chat",
        "fp32",
        5,
        n,
        gamma_max,
        (),
        tokens,
        draft,
        [signals(i) for i in range(n)],
        free,
        prompt=prompt,
    )


@pytest.mark.parametrize("seed", range(6))
def test_oracle_matches_brute_force_and_beats_every_policy(seed):
    trace = random_trace(seed)
    times = np.array([10.0, 12.5, 13.0, 17.0])  # deliberately not linear in γ
    cost = CostModel("fp32", 0.0, (times - 0.0).tolist())
    best = oracle(trace, times)
    assert best.time_s == pytest.approx(brute_force(trace, times))
    for spec in ["fixed:1", "fixed:2", "fixed:3", "heuristic:1", "confidence:0.3"]:
        assert replay(trace, make_controller(spec, gamma_max=3), cost).time_s >= best.time_s - 1e-9


def every_path(trace: Trace, t: int, model_times, copies, copy_times) -> float:
    """The fastest way from t by trying every step from every position (no memory)."""
    if t >= trace.n_tokens:
        return 0.0
    room = trace.max_new_tokens - t - 1
    options = [
        (model_times[g], min(int(trace.run_length[t]), g)) for g in range(min(len(model_times) - 1, room) + 1)
    ]
    chain = copies[t][: min(room, len(copy_times) - 1)]
    for g in range(1, len(chain) + 1):
        matched = next(
            (i for i, (a, b) in enumerate(zip(chain[:g], trace.tokens[t:], strict=False)) if a != b), None
        )
        options.append((copy_times[g], g if matched is None else matched))
    return min(
        s + every_path(trace, t + min(a + 1, trace.n_tokens - t), model_times, copies, copy_times)
        for s, a in options
    )


@pytest.mark.parametrize("seed", range(6))
def test_oracle_with_copies_matches_every_path_and_beats_every_policy(seed):
    trace = random_trace(seed, vocab=3)  # the copies often match
    cost = CostModel("fp32", t_draft_s=2.0, t_verify_s=[10.0, 12.5, 13.0, 17.0])
    copy_times = np.asarray(cost.t_verify_s)
    copies = copy_chains(trace, 3)
    assert any(copies)
    for drafter, model_times in [("model+ngram", cost.step_times()), ("ngram", cost.step_times()[:1])]:
        best = cost_oracle(trace, cost, drafter)
        assert best.time_s == pytest.approx(every_path(trace, 0, model_times, copies, copy_times))
        for spec in ["fixed:1", "fixed:3", "heuristic:1", "speckv"]:
            controller = make_controller(spec, gamma_max=3)
            controller.follow_costs = False
            assert replay(trace, controller, cost, drafter=drafter).time_s >= best.time_s - 1e-9
    # With the draft's reading priced (the prompt, catch-ups after copies), the oracle charges the
    # least of it any policy pays and stays a bound.
    reading = replace(cost, draft_prefill_s_per_token=0.5)
    bound = cost_oracle(trace, reading, "model+ngram").time_s
    for spec in ["fixed:1", "fixed:3", "heuristic:1", "speckv"]:
        controller = make_controller(spec, gamma_max=3)
        controller.follow_costs = False
        assert replay(trace, controller, reading, drafter="model+ngram").time_s >= bound - 1e-9


@pytest.mark.parametrize("prompt", [None, [10, 11, 12, 13]])
def test_trace_survives_its_storage_format(prompt):
    trace = hand_trace(prompt=prompt)
    (back,) = traces_from_frame(trace_to_frame(trace))
    assert back.prompt == prompt
    assert back.tokens == trace.tokens and back.draft_tokens == trace.draft_tokens
    assert back.signals == trace.signals and back.free == trace.free
    assert back.run_length.tolist() == trace.run_length.tolist()
