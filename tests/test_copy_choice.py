"""Copies (n-gram candidates) under SpecKV: their chance by the length of the match they continue
and whether its followers agree, the per-step choice between copies and the draft model, probing
copies passed over, and the step protocol that carries the match to the controller and its
choice to the drafter. Numbers by hand."""

from __future__ import annotations

import pytest
from test_live_controller import FLAT, ConstantDrafter, FakeClock, TimedVerifier
from test_speckv_controller import hand_models

from speckv.controllers.base import Controller
from speckv.controllers.live import CopyChances
from speckv.controllers.speckv import SpecKVController
from speckv.costs import CostModel
from speckv.decoding.drafters.ngram import NGramDrafter
from speckv.decoding.step import run_step
from speckv.decoding.verify import SamplingConfig
from speckv.records import CopyMatch, StepRecord, TokenSignals

# The prior's mix of split and unanimous followers after 2, 3 and 4+ tokens (`UNANIMOUS_SHARE`):
# 0.77·0.57 + 0.23·0.21, 0.91·0.74 + 0.09·0.33, 0.91·0.83 + 0.09·0.33.
MIXED = (0.4872, 0.7031, 0.785)


def test_copy_chances_by_hand():
    chances = CopyChances(strength=4.0)
    # A step's copies continue matches one token longer each: 1, 2, 3, then 4 or more. The first's
    # followers are known (split or unanimous), the later ones' are not: their length's mix.
    assert chances.chances(CopyMatch(1, True), 3) == pytest.approx([0.30, MIXED[0], MIXED[1]])
    assert chances.chances(CopyMatch(3, False), 3) == pytest.approx([0.33, MIXED[2], MIXED[2]])
    assert chances.chance(2, unanimous=False) == 0.21 and chances.chance(9, unanimous=True) == 0.83
    # Of 3 copies after a 2-token match (followers unanimous, split, unanimous) the first was
    # accepted, the second not (the third never judged): (unanimous, 2) and (split, 3) judged
    # once, the first accepted. Expected 0.57 + 0.33 = 0.90, so R = (1 + 4) / (0.90 + 4), and each
    # chance is (accepted + 4·R·prior) / (judged + 4).
    chances.observe(match=2, unanimous=[True, False, True], accepted=1)
    ratio = 5 / 4.9
    assert chances.chance(2, True) == pytest.approx((1 + 4 * ratio * 0.57) / 5)
    assert chances.chance(3, False) == pytest.approx(4 * ratio * 0.33 / 5)
    assert chances.chance(1, True) == pytest.approx(0.30 * ratio)
    chances.new_sequence()  # half the evidence carries over
    assert chances.judged.tolist() == [[0, 0, 0.5, 0], [0, 0.5, 0, 0]]
    assert chances.accepted.tolist() == [[0, 0, 0, 0], [0, 0.5, 0, 0]]


def test_the_step_copies_where_the_match_makes_copies_worth_more_than_the_model():
    # a = 0.9, t_draft = 1, flat t_verify = 10: λ = (1 + Σ_{m≤8} 0.9^m) / 18 = 6.13 / 18 (γ = 8),
    # and the model's 8 tokens are worth 5.13 − λ·18 = −1.0. Eight copies after a unanimous
    # 3-token match (0.74, then 0.785 each at 4+ tokens) reach 0.74, 0.58, 0.46, … 0.14, worth
    # 2.95 − λ·10 = 2.95 − 3.40 = −0.46: copy. After a split one (0.33, then the same) only
    # 1.31 − 3.40: the model drafts; after a unanimous 1-token match (0.30, 0.4872, 0.7031, …) 0.81.
    models = hand_models(accept=0.9)
    models.costs["fp32"] = CostModel("fp32", 1.0, FLAT)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    controller.copies_ahead(CopyMatch(3, unanimous=True))
    assert controller.begin_step() == 8 and controller.copies_chosen() is True
    for match in (CopyMatch(3, unanimous=False), CopyMatch(1, unanimous=True)):
        controller.copies_ahead(match)
        assert controller.begin_step() == 8 and controller.copies_chosen() is False
    assert controller.begin_step() == 8 and controller.copies_chosen() is False  # told afresh each step


def test_a_copy_step_takes_the_prefix_its_chances_pay_for():
    # a = 0.1, t_draft = 1, t_verify = 10 + 1.5·(k − 1): λ = 0.1 (the target alone) and the model's
    # drafting does not pay. Each verified copy widens the pass by 1.5 (λ·1.5 = 0.15). After a
    # unanimous 3-token match the copies reach 0.74, 0.58, 0.46, 0.36, 0.28, 0.22, 0.17, 0.14:
    # seven pay. Drafted, the copies show their own followers: the first two unanimous (0.74,
    # 0.83), then split (0.33 each at 4+ tokens): they reach 0.74, 0.61, 0.20, 0.067, so three
    # are verified. After a unanimous 1-token match the first (0.30) pays and the second
    # (0.30·0.4872 = 0.146) does not; after a split one (0.14) not even the first.
    models = hand_models(accept=0.1)
    models.costs["fp32"] = CostModel("fp32", 1.0, [10.0 + 1.5 * k for k in range(9)])
    controller = SpecKVController(models, "fp32", gamma_max=8)
    assert controller.begin_step() == 0
    controller.copies_ahead(CopyMatch(3, unanimous=True))
    assert controller.begin_step() == 7 and controller.copies_chosen()
    confidence = [1.0, 1.0] + [0.5] * 5  # a copy's confidence: its followers' largest share
    for position, share in enumerate(confidence, 1):  # copies are free: all of the budget is drafted
        assert controller.continue_drafting(TokenSignals(position, 0.0, share, share, free=True))
    record = StepRecord(1, 7, 0, 0, 0, [0.0] * 7, confidence, confidence, drafted=7)
    assert controller.verify_count(record) == 3
    controller.copies_ahead(CopyMatch(1, unanimous=True))
    assert controller.begin_step() == 1 and controller.copies_chosen()
    controller.copies_ahead(CopyMatch(1, unanimous=False))
    assert controller.begin_step() == 0


def test_copies_passed_over_are_taken_now_and_then():
    # Copies only (the n-gram drafter alone): no model to turn to. a = 0.1, t_verify 10, 12, then
    # 40: λ = 0.1, and a copy must be accepted with more than λ·2 = 0.2 to pay. After a split
    # 1-token match (0.14) none does, so none would ever be judged: after 8 steps in a row that
    # passed copies over (the 8th) the step takes them anyway, as many as lose least (one).
    # Rejected, that copy lowers the chance to 4·R·0.14 / 5 = 0.108 (R = 4 / 4.14) and the wait
    # doubles to 16; accepted, the next lifts it to (1 + 4·R·0.14) / 6 = 0.276 (R = 5 / 4.28),
    # which pays: from then on such copies are taken.
    models = hand_models(accept=0.1)
    models.costs["fp32"] = CostModel("fp32", 1.0, [10.0, 12.0] + [40.0] * 7)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    controller.bind(NGramDrafter(vocab_size=16))

    def copy_step(accept: bool) -> int:
        controller.copies_ahead(CopyMatch(1, unanimous=False))
        budget = controller.begin_step()
        record = StepRecord(1, budget, 0, 0, 1)
        if budget:
            assert controller.copies_chosen() and budget == 1
            assert controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5, free=True))
            record = StepRecord(1, 1, 0, 0, 1, [1.0], [0.5], [0.5], drafted=1)
            record.gamma = controller.verify_count(record)
            record.accepted = int(accept)
            record.tokens_produced = record.accepted + 1
        controller.end_step(record)
        return record.gamma

    assert [copy_step(accept=False) for _ in range(8)] == [0] * 7 + [1]
    assert controller.copy_chances.chance(1, False) == pytest.approx(0.56 * (4 / 4.14) / 5)
    assert [copy_step(accept=True) for _ in range(16)] == [0] * 15 + [1]
    assert controller.copy_chances.chance(1, False) == pytest.approx((1 + 0.56 * 5 / 4.28) / 6)
    assert [copy_step(accept=True) for _ in range(3)] == [1, 1, 1]
    controller.copies_ahead(CopyMatch())
    assert controller.begin_step() == 0  # nothing to copy, and no model to draft


def test_copied_tokens_cost_no_draft_pass_and_calibrate_apart():
    # a = 0.5, t_draft = 3, flat t_verify = 10: λ = 1.5/13 (γ = 1). After one drafted token
    # (reach 0.5) one more adds 0.25 expected tokens for λ·3 = 0.35: stop. A drafter that copies
    # without being asked (its first proposal is free) is taken at its word: its tokens cost no
    # draft pass, and their judgement moves the copies' chances, not the model's calibration.
    models = hand_models()
    models.costs["fp32"] = CostModel("fp32", t_draft_s=3.0, t_verify_s=FLAT)
    controller = SpecKVController(models, "fp32", gamma_max=8)
    assert controller.rate.rate == pytest.approx(1.5 / 13)
    assert controller.begin_step() == 8
    assert not controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5))
    controller.begin_step()
    assert controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5, free=True))
    record = StepRecord(1, 8, 1, 0, 1, [1.0], [0.5], [0.5], drafted=1)
    controller.end_step(record)  # the copied token was rejected: only copies are trusted less
    assert controller.copy_chances.chance(1, unanimous=False) < CopyChances.PRIOR[0][0]
    assert controller.acceptance.correct(0.5) == 0.5


class CopyingDrafter(ConstantDrafter):
    """Has a unanimous 2-token match after an even-length context; records the lookups and the choices."""

    def __init__(self):
        self.lookups, self.chosen = 0, []

    def copy_match(self, context):
        self.lookups += 1
        return CopyMatch(2, unanimous=True) if len(context) % 2 == 0 else CopyMatch()

    def use_copies(self, copy):
        self.chosen.append(copy)


class TellMe(Controller):
    def __init__(self, reads: bool):
        self.reads_copies, self.told = reads, []

    def copies_ahead(self, match):
        self.told.append(match)

    def copies_chosen(self):
        return self.told[-1].length > 0

    def begin_step(self):
        return 1


def test_the_step_carries_the_match_to_the_controller_and_its_choice_to_the_drafter():
    for reads in (True, False):
        controller, drafter = TellMe(reads), CopyingDrafter()
        verifier = TimedVerifier(FakeClock(), FLAT)
        for context in ([1, 2], [1, 2, 3]):
            run_step(0, context, 8, controller, drafter, verifier, SamplingConfig(), frozenset())
        assert controller.told == ([CopyMatch(2, True), CopyMatch()] if reads else [])
        assert drafter.chosen == ([True, False] if reads else [])
        assert drafter.lookups == (2 if reads else 0)  # no lookup for a controller that ignores it
