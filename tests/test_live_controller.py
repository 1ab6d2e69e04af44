"""What SpecKV learns while it decodes: the live cost curve, calibrated acceptance, λ, probing,
and wider passes that cost less; numbers worked out by hand, and a fake clock driving the real step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_speckv_controller import hand_models

from speckv.controllers.live import LiveAcceptance, LiveCosts, RateTracker, SignalSpread, derive_rate
from speckv.controllers.sequence_context import SequenceContext
from speckv.controllers.speckv import SpecKVController
from speckv.costs import CostModel
from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.step import run_step
from speckv.decoding.verify import SamplingConfig
from speckv.records import StepRecord, TokenSignals

FLAT = [10.0] * 9


def step(gamma: int, accepted: int, verify_s: float, drafted: int | None = None, draft_s: float = 0.0):
    drafted = gamma if drafted is None else drafted
    record = StepRecord(1, gamma, gamma, accepted, accepted + 1, drafted=drafted)
    record.verify_time_s, record.draft_time_s = verify_s, draft_s
    return record


def test_derive_rate_by_hand():
    # a = 0.5, t_draft = 1, flat t_verify = 10: γ = 0..3 give 1/10, 1.5/11, 1.75/12, 1.875/13 → γ = 2.
    cost = CostModel("fp32", 1.0, FLAT)
    assert derive_rate(0.5, cost) == pytest.approx(1.75 / 12)
    # Steep verification: the target alone (1/10) beats 1.5/21 and 1.75/32.
    assert derive_rate(0.5, CostModel("fp32", 1.0, [10.0 * k for k in range(1, 10)])) == pytest.approx(0.1)


def test_live_costs_follow_measured_steps_and_shrug_off_a_stall():
    costs = LiveCosts(CostModel("fp32", 1.0, FLAT))
    costs.observe(step(2, 1, 20.0))  # width 3 ran 2× slower: log error log 2
    machine = 0.1 * math.log(2)
    assert costs.machine == pytest.approx(machine)
    assert costs.width[2] == pytest.approx(0.2 * 0.9 * math.log(2))
    estimate = costs.t_verify()
    assert estimate[0] == pytest.approx(10 * math.exp(machine))  # unseen widths move with the machine
    assert estimate[2] == pytest.approx(10 * math.exp(machine + 0.18 * math.log(2)))
    stalled = LiveCosts(CostModel("fp32", 1.0, FLAT))
    stalled.observe(step(2, 1, 10_000.0))  # a 1000× stall counts as 2× at most
    assert stalled.t_verify()[2] == pytest.approx(estimate[2])
    first = step(2, 1, 20.0)
    first.step = 0  # reads the prompt: not a step cost
    untouched = LiveCosts(CostModel("fp32", 1.0, FLAT))
    untouched.observe(first)
    assert untouched.t_verify() == pytest.approx(FLAT)


def test_the_draft_time_per_token_counts_the_model_tokens_alone():
    costs = LiveCosts(CostModel("fp32", 1.0, FLAT))
    copies = step(3, 1, 10.0, draft_s=0.001)
    copies.copied = 3  # n-gram candidates: no draft pass to learn from
    costs.observe(copies)
    assert costs.t_draft_s == 1.0
    mixed = step(4, 1, 10.0, draft_s=2.0)
    mixed.copied = 3  # one model token took 2 s: the estimate moves as for a 2× slower draft
    costs.observe(mixed)
    assert costs.t_draft_s == pytest.approx(2.0**0.2)


def test_the_draft_time_per_token_leaves_out_reading_what_the_model_sat_out():
    # Reading costs 0.5 per token beyond one. A pass that first read 5 tokens (2 of its 4 s) and
    # drafted 2 tokens: 1 s per token, the estimate stays; without the reading it would double.
    costs = LiveCosts(CostModel("fp32", 1.0, FLAT, draft_prefill_s_per_token=0.5))
    caught_up = step(2, 1, 10.0, draft_s=4.0)
    caught_up.draft_read = 5
    costs.observe(caught_up)
    assert costs.t_draft_s == pytest.approx(1.0)
    caught_up.draft_read = 1
    costs.observe(caught_up)
    assert costs.t_draft_s == pytest.approx(2.0**0.2)


def test_live_acceptance_by_hand():
    calibration = LiveAcceptance(strength=6.0)
    assert calibration.correct(0.5) == 0.5  # nothing observed: the model as it is
    # Three tokens predicted 0.5 each, none accepted: only the first was judged.
    calibration.observe([0.5, 0.5, 0.5], accepted=0)
    overall = (0 + 6) / (0.5 + 6)
    ratio = (0 + 6 * overall) / (0.5 + 6)  # bin [0.4, 0.6)
    assert calibration.correct(0.5) == pytest.approx(0.5 * ratio)
    assert calibration.correct(0.1) == pytest.approx(0.1 * overall)  # an empty bin: the overall ratio
    assert calibration.correct_many(np.array([0.5, 0.1])) == pytest.approx([0.5 * ratio, 0.1 * overall])
    calibration.new_sequence()  # the next sequence starts from half the evidence
    overall = (0 + 6) / (0.25 + 6)
    assert calibration.correct(0.5) == pytest.approx(0.5 * (0 + 6 * overall) / (0.25 + 6))
    calibration.reset()
    assert calibration.correct(0.5) == 0.5


def test_rate_tracker_starts_from_the_derived_rate_and_follows_the_sequence():
    rate = RateTracker(pseudo_steps=4.0)
    rate.start(0.2, target_step_s=10.0)  # as if 4 steps of 10 s had given 0.2 tokens/s
    assert rate.rate == pytest.approx(0.2)
    rate.observe(3, 10.0)
    assert rate.rate == pytest.approx((8 + 3) / 50)


def test_probes_back_off_while_drafting_never_pays():
    controller = SpecKVController(hand_models(), "int8", gamma_max=8)  # a drafted token costs 100
    budgets = [controller.begin_step() for _ in range(8 + 16 + 32)]
    probes = [i + 1 for i, b in enumerate(budgets) if b]
    assert probes == [8, 8 + 16, 8 + 16 + 32]  # 8 (the file's), then twice as long each time
    controller.reset()  # a new sequence of the stream starts from half the wait
    assert [controller.begin_step() for _ in range(32)] == [0] * 31 + [1]
    # The probe is verified even where its token looks unlikely: else the step would teach nothing.
    record = StepRecord(1, 1, 0, 0, 0, [9.0], [0.05], [0.05], drafted=1)
    assert controller.verify_count(record) == 1
    record.accepted, record.tokens_produced = 1, 2  # it found a token: the wait (64) halves
    controller.end_step(record)
    assert [controller.begin_step() for _ in range(32)] == [0] * 31 + [1]


def test_a_probe_drafts_the_length_that_loses_least():
    # a = 0.1, t_draft = 1, a pass of 5 tokens costs 12 and of 2-4 or 6+ costs 40: λ = 0.1 (the
    # target alone). After 8 idle steps the probe drafts 4 (step time 16), not 1 (step time 41),
    # and verifies all 4 whatever they look like.
    models = hand_models(accept=0.1)
    models.costs["fp32"] = CostModel("fp32", 1.0, [10.0, 40.0, 40.0, 40.0, 12.0, 40.0, 40.0, 40.0, 40.0])
    controller = SpecKVController(models, "fp32", gamma_max=8)
    assert [controller.begin_step() for _ in range(8)] == [0] * 7 + [4]
    assert all(controller.continue_drafting(TokenSignals(i, 9.0, 0.05, 0.05)) for i in (1, 2, 3))
    record = StepRecord(1, 4, 0, 0, 0, [9.0] * 4, [0.05] * 4, [0.05] * 4, drafted=4)
    assert controller.verify_count(record) == 4


def test_drafting_stops_where_it_would_go_on_only_to_drop_every_token():
    # a = 0.1, t_draft = 1, passes of 2-4 tokens cost 40 and of 5 only 12, λ = 0.1. After one token
    # (reach 0.1) going on to the cheap width costs less than verifying 2 tokens, but verifying
    # none (1 − λ·10 = 0) beats both: 3 more tokens would add 0.011 for λ·(3 + 12) = 1.5.
    models = hand_models(accept=0.1)
    models.costs["fp32"] = CostModel("fp32", 1.0, [10.0, 40.0, 40.0, 40.0, 12.0, 40.0, 40.0, 40.0, 40.0])
    controller = SpecKVController(models, "fp32", gamma_max=8)
    controller.begin_step()
    assert not controller.continue_drafting(TokenSignals(1, 1.0, 0.1, 0.1))
    record = StepRecord(1, 8, 0, 0, 0, [1.0], [0.1], [0.1], drafted=1)
    assert controller.verify_count(record) == 0


def test_idle_steps_revert_the_context_to_the_sequence_long_run():
    context = SequenceContext(decay=0.3)
    context.update(StepRecord(1, 4, 4, 0, 1, [1.0] * 4, [0.5] * 4, [0.5] * 4, drafted=4))
    # One judged token, rejected: recent 0.5 → 0.35, last 0, long run 0.5 → 0.475.
    assert context.values[1:3] == pytest.approx([0.35, 0.0])
    assert context.long_run == pytest.approx(0.475)
    context.update(StepRecord(2, 0, 0, 0, 1))  # nothing drafted: the text moved on unobserved
    assert context.values[1:3] == pytest.approx([0.35 + 0.3 * 0.125, 0.3 * 0.475])
    assert context.long_run == pytest.approx(0.475)


def test_peek_gain_by_hand():
    # prior 0.2, λ = 0.1, t_draft = 3, flat verify 10: charges 1.0, 1.3, 1.6; gains 0, 0.2, 0.24.
    spread = SignalSpread()
    gains, charges = np.array([0.0, 0.2, 0.24]), np.array([1.0, 1.3, 1.6])
    assert spread.peek_gain(0.2, gains, charges, 0.3) == -math.inf  # nothing seen yet
    for first_token in [0.9] * 4 + [0.05] * 4:
        spread.observe(first_token, 0.2)
    # First token a₁ = 0.9: 1 token adds 0.9 for 0 more (its drafting is paid), 2 add 0.9·1.2 for
    # 0.3 → 0.9. a₁ = 0.05: 0.05. Mean 0.475, less the look's 0.3.
    assert spread.peek_gain(0.2, gains, charges, 0.3) == pytest.approx(0.175)
    flat = SignalSpread()
    for _ in range(8):
        flat.observe(0.2, 0.2)  # signals that never move the prediction: the look is just a cost
    assert flat.peek_gain(0.2, gains, charges, 0.3) == pytest.approx(0.2 - 0.3)


def test_a_peek_where_first_tokens_often_look_sure():
    # a = 0.2, t_draft = 3, flat verify 10: λ = 0.1 and the context alone says do not draft.
    models = hand_models(accept=0.2)
    models.costs["fp32"] = CostModel("fp32", t_draft_s=3.0, t_verify_s=FLAT)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    assert controller.begin_step() == 0
    for _ in range(8):  # first tokens' signals have never said more than the context
        controller.spread.observe(0.2, 0.2)
    assert controller.begin_step() == 0
    for first_token in [0.9] * 8 + [0.05] * 8:  # half of the last 16 were near-sure
        controller.spread.observe(first_token, 0.2)
    assert controller.begin_step() == 8  # a budget: its first token decides the rest
    # The constant model's first token (0.2) says drafting on does not pay: it stops there, and
    # verifies that token, since on a flat curve its verification costs nothing more.
    assert not controller.continue_drafting(TokenSignals(1, 1.0, 0.2, 0.2))
    record = StepRecord(1, 8, 0, 0, 0, [1.0], [0.2], [0.2], drafted=1)
    assert controller.verify_count(record) == 1
    assert controller.spread.shifts[-1] == pytest.approx(0.0)  # and the look joined the spread


def test_verify_count_takes_a_wider_pass_that_costs_less():
    # a = 0.5, λ derived: 4 tokens verify for 12 but 3 cost 30, so verifying all 3 drafted beats 2.
    models = hand_models()
    models.costs["fp32"] = CostModel("fp32", t_draft_s=1.0, t_verify_s=[10.0, 12.0, 30.0, 12.0] + [30.0] * 5)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    controller.begin_step()
    record = StepRecord(0, 3, 0, 0, 0, [1.0] * 3, [0.5] * 3, [0.5] * 3, drafted=3)
    assert controller.verify_count(record) == 3


class ConstantDrafter(Drafter):
    """Proposes token 5 with fixed signals; the fake verifier accepts `accept` of them."""

    name = "constant"

    def draft(self, context, budget, sampling, generator):
        for _ in range(budget):
            yield Proposal(5, 1.0, 0.6, 0.6)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedVerifier:
    """Accepts drafted tokens one in two and advances the clock by curve[k - 1] for k tokens."""

    def __init__(self, clock: FakeClock, curve: list[float]):
        self.clock, self.curve = clock, curve

    def verify(self, context, drafted, parents, draft_probs, generator) -> Verdict:
        self.clock.now += self.curve[len(drafted)]
        accepted = drafted[: len(drafted) // 2]
        return Verdict(accepted, 7, path=list(range(len(accepted))))

    def rollback(self, kept: int) -> None:
        pass


def run_with_curve(controller, clock, verifier, steps, start):
    gammas, context = [], [1, 2, 3]
    for i in range(start, start + steps):
        record, tokens = run_step(
            i,
            context,
            64,
            controller,
            ConstantDrafter(),
            verifier,
            SamplingConfig(),
            frozenset(),
            clock=clock,
        )
        context.extend(tokens)
        gammas.append(record.gamma)
    return gammas


def test_a_steeper_curve_mid_sequence_makes_gamma_fall():
    """The plan starts from a flat curve; the fake clock then charges a steep one (each verified
    token as much as the whole pass was): the controller sees it in the measured times and drafts less."""
    models = hand_models(accept=0.6)
    models.costs["fp32"] = CostModel("fp32", t_draft_s=0.5, t_verify_s=FLAT)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    controller.bind(ConstantDrafter())
    controller.reset()
    clock = FakeClock()
    verifier = TimedVerifier(clock, FLAT)
    flat = run_with_curve(controller, clock, verifier, 20, start=0)
    verifier.curve = [10.0 * k for k in range(1, 10)]
    steep = run_with_curve(controller, clock, verifier, 40, start=20)
    assert np.mean(flat[5:]) >= 2
    assert np.mean(steep[-10:]) < np.mean(flat[5:]) / 2
    used = max(set(steep[-10:]), key=steep[-10:].count)
    assert controller.costs.t_verify()[used] == pytest.approx(10.0 * (used + 1), rel=0.1)  # learned


def test_poor_acceptance_on_this_text_makes_the_controller_draft_less():
    models = hand_models(accept=0.7)
    controller = SpecKVController(models, "fp32", gamma_max=8, per_token=False)
    first = controller.begin_step()
    for _ in range(10):  # the draft's tokens keep being rejected at once
        record = StepRecord(1, 4, 4, 0, 1, [1.0] * 4, [0.7] * 4, [0.7] * 4, drafted=4)
        record.verify_time_s = 10.0
        controller.end_step(record)
        later = controller.begin_step()
    assert first >= 3 and later < first
    assert controller.acceptance.correct(0.7) < 0.35


def test_drafting_goes_on_to_a_wider_pass_that_costs_less():
    # a = 0.5, t_draft = 1; passes of 2 or 3 tokens cost 20, of 4 or 5 only 12: λ = 1.875/15 (γ = 3).
    # After 2 tokens (reach 0.25) one more adds 0.125 and makes the step cheaper (15 < 22): go on;
    # after 3 (reach 0.125) one more adds 0.0625 for λ·1 = 0.125: stop, at the cheap width.
    models = hand_models()
    models.costs["fp32"] = CostModel("fp32", 1.0, [10.0, 20.0, 20.0, 12.0, 12.0, 30.0, 30.0, 30.0, 30.0])
    controller = SpecKVController(models, "fp32", gamma_max=8)
    assert controller.rate.rate == pytest.approx(1.875 / 15)
    controller.begin_step()
    assert controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5))
    assert controller.continue_drafting(TokenSignals(2, 1.0, 0.5, 0.5))
    assert not controller.continue_drafting(TokenSignals(3, 1.0, 0.5, 0.5))
    record = StepRecord(0, 8, 0, 0, 0, [1.0] * 3, [0.5] * 3, [0.5] * 3, drafted=3)
    assert controller.verify_count(record) == 3
