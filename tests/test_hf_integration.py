"""SpecKV's controllers inside transformers' `generate` (`custom_generate=SpecKVAssisted(draft)`):
the output is the target's own greedy output, and the controller really decides every step."""

from __future__ import annotations

import pytest
import torch
from conftest import PrefixController, loaded, perturbed_copy, tiny_model

from speckv.controllers import FixedController, make_controller
from speckv.controllers.base import Controller
from speckv.decoding.draft_files import _restrict_head
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import model_level, wrap_model
from speckv.errors import SpecKVError
from speckv.integrations.hf import SpecKVAssisted

PROMPTS = ([3, 4, 5], [7, 8, 9, 10, 11], [20])


def greedy(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    input_ids = torch.tensor([prompt])
    output = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return output[0, len(prompt) :].tolist()


class Spy(FixedController):
    """Fixed γ, counting what the loop asks and keeping every record it reports."""

    def __init__(self, gamma: int):
        super().__init__(gamma)
        self.resets, self.asked, self.records = 0, [], []

    def reset(self) -> None:
        self.resets += 1

    def continue_drafting(self, signals) -> bool:
        self.asked.append(signals)
        return True

    def end_step(self, record) -> None:
        self.records.append(record)


class Never(Controller):
    name = "never"

    def begin_step(self) -> int:
        return 0


class StopAfter(Controller):
    """A budget of 6, drafting stopped after the `after`-th token."""

    name = "stop-after"

    def __init__(self, after: int):
        self.after = after

    def begin_step(self) -> int:
        return 6

    def continue_drafting(self, signals) -> bool:
        return signals.position < self.after


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:4", "heuristic", "confidence", "speckv", "speckv-step"])
@pytest.mark.parametrize("draft_name", ["close", "identical", "unrelated"])
def test_output_is_transformers_greedy_output(tiny_target, tiny_drafts, spec, draft_name):
    target = tiny_target.model
    assisted = SpecKVAssisted(tiny_drafts[draft_name].model, spec, costs="shipped", progress=False)
    for prompt in PROMPTS:
        expected = greedy(target, prompt, 24)
        assert greedy(target, prompt, 24, custom_generate=assisted) == expected, prompt
        assert sum(s.tokens_produced for s in assisted.steps) == len(expected)


def test_speckv_plans_with_the_pair_measured_here(tiny_target, tiny_drafts):
    """The default controller is the learned one, on the cost curve measured for this pair (the
    target's tokenizer comes with a `LoadedModel` draft), and it learns from HF's steps."""
    assisted = SpecKVAssisted(tiny_drafts["identical"], progress=False)
    prompt = PROMPTS[1]
    assert greedy(tiny_target.model, prompt, 32, custom_generate=assisted) == greedy(
        tiny_target.model, prompt, 32
    )
    assert assisted.controller.name == "speckv"
    assert assisted.cost_source.startswith(("measured now", "cached"))
    assert assisted.controller.acceptance.observed.sum() > 0  # HF's verdicts reached its calibration
    assert all(s.verify_time_s > 0 for s in assisted.steps)
    assert all(s.draft_time_s > 0 for s in assisted.steps if s.drafted)


def test_auto_costs_need_the_target_tokenizer(tiny_target, tiny_drafts):
    assisted = SpecKVAssisted(tiny_drafts["close"].model, progress=False)  # no tokenizer anywhere
    with pytest.raises(SpecKVError, match="tokenizer"):
        greedy(tiny_target.model, PROMPTS[0], 4, custom_generate=assisted)
    measured = SpecKVAssisted(tiny_drafts["close"].model, tokenizer=tiny_target.tokenizer, progress=False)
    assert greedy(tiny_target.model, PROMPTS[0], 8, custom_generate=measured) == greedy(
        tiny_target.model, PROMPTS[0], 8
    )
    assert measured.cost_source is not None


def test_fixed_one_verifies_one_candidate_per_step(tiny_target, tiny_drafts):
    """The target's own passes show it: after the prompt, each pass scores one candidate and the
    token after it; the budget 1 is never asked about (it is the cap)."""
    widths = []
    hook = tiny_target.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    spy = Spy(1)
    try:
        tokens = greedy(
            tiny_target.model, PROMPTS[0], 12, custom_generate=SpecKVAssisted(tiny_drafts["close"].model, spy)
        )
    finally:
        hook.remove()
    *steps, last = spy.records
    assert all(r.gamma == 1 for r in steps) and last.gamma == last.gamma_budget  # 0 when one token is left
    assert widths == [len(PROMPTS[0]) + 1] + [r.gamma + 1 for r in spy.records[1:]]
    assert sum(r.tokens_produced for r in spy.records) == len(tokens) == 12
    assert spy.asked == [] and spy.resets == 1


def test_the_controller_hears_every_drafted_token_with_the_engines_signals(tiny_target, tiny_drafts):
    """Each drafted token's signals are those SpecKV's own drafter computes (same steps with a
    fixed γ), and the controller is asked after each but the last of the budget."""
    draft = tiny_drafts["close"]
    spy = Spy(3)
    greedy(tiny_target.model, PROMPTS[1], 20, custom_generate=SpecKVAssisted(draft.model, spy))
    ours = SpeculativeDecoder(tiny_target, draft, make_controller("fixed:3")).generate(PROMPTS[1], 20)
    assert [(r.gamma, r.accepted) for r in spy.records] == [(s.gamma, s.accepted) for s in ours.steps]
    for theirs, mine in zip(spy.records, ours.steps, strict=True):
        for field in ("draft_entropy", "draft_confidence", "draft_token_prob"):
            assert getattr(theirs, field) == pytest.approx(getattr(mine, field), rel=1e-4, abs=1e-5)
    # asked after every drafted token but the step's last (the budget, or an end-of-sequence token)
    assert [a.position for a in spy.asked] == [p for s in spy.records for p in range(1, s.drafted)]
    assert [a.entropy for a in spy.asked] == [e for s in spy.records for e in s.draft_entropy[:-1]]


def test_stopping_early_and_verifying_a_prefix(tiny_target, tiny_drafts):
    target, draft = tiny_target.model, tiny_drafts["identical"].model
    stop = SpecKVAssisted(draft, StopAfter(2))
    assert greedy(target, PROMPTS[0], 16, custom_generate=stop) == greedy(target, PROMPTS[0], 16)
    assert max(s.drafted for s in stop.steps) == 2
    prefix = PrefixController(5, threshold=0.9)
    cut = SpecKVAssisted(draft, prefix)
    assert greedy(target, PROMPTS[0], 16, custom_generate=cut) == greedy(target, PROMPTS[0], 16)
    assert prefix.asked == sum(1 for s in cut.steps if s.drafted)
    kept = [(s.gamma, s.draft_confidence) for s in cut.steps if s.drafted]
    assert all(g == len(c) or c[g] < 0.9 for g, c in kept) and any(g < len(c) for g, c in kept)


def test_a_step_without_drafting_is_a_target_step(tiny_target, tiny_drafts):
    """Budget 0 from the first step on (the assistant has no cache yet), and after drafting."""
    target = tiny_target.model
    never = SpecKVAssisted(tiny_drafts["close"].model, Never())
    assert greedy(target, PROMPTS[1], 10, custom_generate=never) == greedy(target, PROMPTS[1], 10)
    assert [s.drafted for s in never.steps] == [0] * 10

    class Alternate(Controller):
        name = "alternate"
        calls = 0

        def begin_step(self) -> int:
            self.calls += 1
            return 0 if self.calls % 2 else 3

    mixed = SpecKVAssisted(tiny_drafts["identical"].model, Alternate())
    assert greedy(target, PROMPTS[1], 20, custom_generate=mixed) == greedy(target, PROMPTS[1], 20)
    assert {s.drafted for s in mixed.steps} >= {0, 3}


def test_a_reduced_vocabulary_draft(tiny_target):
    draft = loaded(perturbed_copy(tiny_target.model, seed=7, noise=0.01), "reduced")
    _restrict_head(draft, torch.arange(0, 40))  # the draft may only propose tokens 0..39
    assisted = SpecKVAssisted(draft, "fixed:3")
    for prompt in PROMPTS:
        assert greedy(tiny_target.model, prompt, 16, custom_generate=assisted) == greedy(
            tiny_target.model, prompt, 16
        )
    assert all(0 <= c <= 1 for s in assisted.steps for c in s.draft_confidence)


def test_sampling_runs_and_never_asks_for_a_prefix(tiny_target, tiny_drafts):
    """Sampling is transformers' own speculative sampling; dropping drafted tokens by their own
    probability would bias it, so `verify_count` is not asked."""
    prefix = PrefixController(3, threshold=0.0)
    assisted = SpecKVAssisted(tiny_drafts["close"].model, prefix)
    torch.manual_seed(0)
    output = tiny_target.model.generate(
        torch.tensor([PROMPTS[0]]), do_sample=True, max_new_tokens=12, custom_generate=assisted
    )
    assert output.shape[1] <= len(PROMPTS[0]) + 12 and prefix.asked == 0
    assert any(s.drafted for s in assisted.steps)


def test_controller_state_carries_over_and_resets_per_generation(tiny_target, tiny_drafts):
    spy = Spy(2)
    assisted = SpecKVAssisted(tiny_drafts["close"].model, spy)
    steps = []
    for prompt in PROMPTS:
        greedy(tiny_target.model, prompt, 6, custom_generate=assisted)
        steps.append(len(assisted.steps))  # the last generation's
    assert spy.resets == len(PROMPTS) and len(spy.records) == sum(steps)
    assert [r.step for r in spy.records] == [i for n in steps for i in range(n)]


def test_generate_leaves_the_models_as_they_were(tiny_target, tiny_drafts):
    target, draft = tiny_target.model, tiny_drafts["close"].model
    config = draft.generation_config
    saved = config.num_assistant_tokens_schedule, config.num_assistant_tokens
    # a heuristic schedule's state is written back to the assistant after each generation
    config.num_assistant_tokens_schedule, config.num_assistant_tokens = "heuristic", 7
    try:
        greedy(target, PROMPTS[0], 12, custom_generate=SpecKVAssisted(draft, "fixed:3"))
        assert config.num_assistant_tokens == 7
    finally:
        config.num_assistant_tokens_schedule, config.num_assistant_tokens = saved
    assert "_get_candidate_generator" not in vars(target)


def test_unusable_pairs_and_controllers_fail_in_one_line(tiny_target, tiny_drafts):
    with pytest.raises(SpecKVError, match="token trees"):
        greedy(
            tiny_target.model,
            PROMPTS[0],
            4,
            custom_generate=SpecKVAssisted(tiny_drafts["close"].model, "tree:4"),
        )
    other = tiny_model(seed=5, vocab=72)
    with pytest.raises(SpecKVError, match="vocabulary"):
        greedy(tiny_target.model, PROMPTS[0], 4, custom_generate=SpecKVAssisted(other, "fixed:2"))


def test_wrap_model_reads_the_level(tiny_target):
    assert model_level(tiny_target.model) == "fp32"
    wrapped = wrap_model(tiny_model(seed=1).to(torch.bfloat16), tiny_target.tokenizer, name="half")
    assert (wrapped.compression, wrapped.precision, wrapped.name) == ("bf16", "bf16", "half")
    assert wrap_model(tiny_target.model, None).name == "LlamaForCausalLM"
