"""Profiling on tiny models: replay of recorded traces equals the live engine, and reruns resume."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import PrefixController, loaded, perturbed_copy

from speckv.controllers import make_controller
from speckv.costs import CostModel
from speckv.decoding.drafters import ModelDrafter, NGramDrafter, SwitchingChainDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.errors import SpecKVError
from speckv.pipeline.profiling import (
    ProfilePrompt,
    ProfileSettings,
    load_steps,
    load_traces,
    record_trace,
    run_profile,
    summary_table,
)
from speckv.pipeline.replay import replay

PROMPTS = [[7, 3, 9, 11, 2], [5], list(range(2, 20))]
GAMMA_MAX = 8
NEW_TOKENS = 40
SPECS = [f"fixed:{g}" for g in range(1, GAMMA_MAX + 1)] + [
    "heuristic",
    "confidence:0.5",
    "confidence-fixed:0.9",
]


@pytest.fixture(scope="module")
def mixed_draft(tiny_target):
    """A draft that agrees with the target on runs of varying length (L(t) from 0 to 9+)."""
    return loaded(perturbed_copy(tiny_target.model, seed=2, noise=0.004), "mixed")


@pytest.fixture(scope="module")
def traces(tiny_target, mixed_draft):
    return [
        record_trace(tiny_target, mixed_draft, p, NEW_TOKENS, GAMMA_MAX, eos_token_ids=()) for p in PROMPTS
    ]


def test_trace_is_the_target_greedy_output_with_matching_signals(tiny_target, mixed_draft, traces):
    for prompt, trace in zip(PROMPTS, traces, strict=True):
        live = SpeculativeDecoder(tiny_target, eos_token_ids=()).generate(prompt, NEW_TOKENS)
        assert trace.tokens == live.token_ids
        mismatches = [t for t in range(trace.n_tokens) if trace.tokens[t] != trace.draft_tokens[t]]
        assert sorted(trace.free) == mismatches
        assert all(len(trace.free[m]) == GAMMA_MAX - 1 for m in mismatches)
    misses = sum(int((t.run_length == 0).sum()) for t in traces)
    assert 0 < misses < sum(t.n_tokens for t in traces) / 2  # the draft both hits and misses


@pytest.mark.parametrize("spec", SPECS)
def test_replay_equals_the_live_engine_step_by_step(tiny_target, mixed_draft, traces, spec):
    live_controller = make_controller(spec, gamma_max=GAMMA_MAX)
    replay_controller = make_controller(spec, gamma_max=GAMMA_MAX)
    decoder = SpeculativeDecoder(tiny_target, mixed_draft, live_controller, eos_token_ids=())
    for prompt, trace in zip(PROMPTS, traces, strict=True):  # adaptive state carries across prompts
        live = decoder.generate(prompt, NEW_TOKENS)
        replayed = replay(trace, replay_controller, keep_records=True)
        # draft_read: the replayed draft model reads what the live one did (the prompt, then 1 or 2)
        assert [
            (s.gamma_budget, s.gamma, s.accepted, s.tokens_produced, s.draft_read) for s in live.steps
        ] == [
            (s.gamma_budget, s.gamma, s.accepted, s.tokens_produced, s.draft_read) for s in replayed.records
        ]
        for a, b in zip(live.steps, replayed.records, strict=True):
            assert a.draft_entropy == pytest.approx(b.draft_entropy, abs=1e-4)
            assert a.draft_token_prob == pytest.approx(b.draft_token_prob, abs=1e-5)


@pytest.mark.parametrize("source", ["model+ngram", "ngram"])
@pytest.mark.parametrize("spec", ["fixed:3", "heuristic", "speckv"])
def test_replay_with_copies_equals_the_live_engine(tiny_target, mixed_draft, traces, source, spec):
    """N-gram copies are computed in replay from the trace's prompt and y: the same steps as live,
    where the controller chooses per step between the model's chain and the copies (SpecKV) or
    the drafter's own rule does."""
    vocab = tiny_target.model.config.vocab_size
    copies = NGramDrafter(vocab)
    drafter = copies if source == "ngram" else SwitchingChainDrafter(ModelDrafter(mixed_draft, vocab), copies)
    controllers = [make_controller(spec, gamma_max=GAMMA_MAX) for _ in range(2)]
    for controller in controllers:
        controller.follow_costs = False  # decide on the modelled costs, as replay does
    decoder = SpeculativeDecoder(tiny_target, drafter, controllers[0], eos_token_ids=())
    copied = caught_up = 0
    for prompt, trace in zip(PROMPTS, traces, strict=True):
        live = decoder.generate(prompt, NEW_TOKENS)
        replayed = replay(trace, controllers[1], keep_records=True, drafter=source)
        # draft_read: the model catches up on what it sat out, in replay as live
        steps = [
            (s.gamma_budget, s.gamma, s.accepted, s.tokens_produced, s.copied, s.draft_read)
            for s in live.steps
        ]
        assert steps == [
            (s.gamma_budget, s.gamma, s.accepted, s.tokens_produced, s.copied, s.draft_read)
            for s in replayed.records
        ]
        copied += sum(s.copied for s in live.steps)
        caught_up += sum(s.draft_read > 2 for s in live.steps[1:])
    assert copied > 0  # the copies were tried
    if source == "model+ngram" and spec == "fixed:3":
        assert caught_up > 0  # the model read tokens it sat out


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_replay_equals_the_live_engine_when_only_a_prefix_is_verified(
    tiny_target, mixed_draft, traces, threshold
):
    cost = CostModel("fp32", t_draft_s=1.0, t_verify_s=[10.0 + k for k in range(GAMMA_MAX + 1)])
    decoder = SpeculativeDecoder(tiny_target, mixed_draft, PrefixController(5, threshold), eos_token_ids=())
    dropped = 0
    for prompt, trace in zip(PROMPTS, traces, strict=True):
        live = decoder.generate(prompt, NEW_TOKENS)
        replayed = replay(trace, PrefixController(5, threshold), cost, keep_records=True)
        fields = [(s.drafted, s.gamma, s.accepted, s.tokens_produced) for s in live.steps]
        assert fields == [(s.drafted, s.gamma, s.accepted, s.tokens_produced) for s in replayed.records]
        # Time: every drafted token is paid, the target pass only over the verified ones.
        expected = sum(s.drafted * 1.0 + 10.0 + s.gamma for s in live.steps)
        assert replayed.time_s == pytest.approx(
            expected + cost.prefill_time(trace.prompt_len, speculative=True)
        )
        dropped += sum(s.drafted - s.gamma for s in live.steps)
    assert dropped > 0  # the case under test happened


def test_traces_with_end_of_sequence(tiny_target, mixed_draft):
    """With an EOS the target emits, replay still follows the engine (EOS stops drafting and decoding)."""
    prompt = PROMPTS[0]
    tokens = SpeculativeDecoder(tiny_target, eos_token_ids=()).generate(prompt, NEW_TOKENS).token_ids
    eos = (tokens[25],)  # pretend a token the target emits mid-way ends the sequence
    trace = record_trace(tiny_target, mixed_draft, prompt, NEW_TOKENS, GAMMA_MAX, eos_token_ids=eos)
    assert trace.tokens[-1] == eos[0] and trace.n_tokens <= 26
    for spec in ("fixed:3", "fixed:8", "heuristic"):
        decoder = SpeculativeDecoder(tiny_target, mixed_draft, make_controller(spec, 8), eos_token_ids=eos)
        live = decoder.generate(prompt, NEW_TOKENS)
        replayed = replay(trace, make_controller(spec, 8), keep_records=True)
        assert [(s.gamma, s.accepted, s.tokens_produced) for s in live.steps] == [
            (s.gamma, s.accepted, s.tokens_produced) for s in replayed.records
        ]


def test_profile_resumes_without_loss_or_duplicates(tmp_path, tiny_target, mixed_draft):
    settings = ProfileSettings("tiny", "mixed", ("fp32",), 12, 4, ("fixed:2", "heuristic"))
    prompts = [ProfilePrompt(f"chat/{i}", "chat", tuple(p)) for i, p in enumerate(PROMPTS)]
    loads = []

    def load_pair(compression):
        loads.append(compression)
        return tiny_target, mixed_draft

    assert run_profile(tmp_path, settings, prompts, load_pair, progress=False) == {
        "recorded": 3,
        "skipped": 0,
    }
    first_steps = load_steps(tmp_path)
    # A run killed mid-unit leaves at most a .tmp file; a unit file removed is recorded again
    # (damaged files too: tests/test_robustness_profile.py).
    victim = next((tmp_path / "replay" / "fp32").glob("*.parquet"))
    victim.unlink()
    (tmp_path / "replay" / "fp32" / "half-written.parquet.tmp").write_bytes(b"junk")
    assert run_profile(tmp_path, settings, prompts, load_pair, progress=False) == {
        "recorded": 1,
        "skipped": 2,
    }
    assert not list(tmp_path.rglob("*.tmp"))  # what the killed run left is removed
    assert run_profile(tmp_path, settings, prompts, load_pair, progress=False) == {
        "recorded": 0,
        "skipped": 3,
    }
    assert loads == ["fp32", "fp32"]  # the last rerun had nothing to do and loaded no model
    traces = load_traces(tmp_path)
    assert [t.prompt_id for t in traces] == [p.id for p in prompts]
    steps = load_steps(tmp_path)
    assert len(steps) == len(first_steps)
    assert not steps.duplicated(["prompt_id", "controller", "step"]).any()
    table = summary_table(steps)
    assert set(table["controller"]) == {"fixed:2", "heuristic"}
    assert (table["tokens_per_s"] > 0).all()
    other = ProfileSettings("tiny", "mixed", ("fp32",), 16, 4, ())
    with pytest.raises(SpecKVError, match="max_new_tokens"):
        run_profile(tmp_path, other, prompts, load_pair, progress=False)
    reencoded = [ProfilePrompt("chat/0", "chat", (9, 9, 9))]
    with pytest.raises(SpecKVError, match="encodes differently"):
        run_profile(tmp_path, settings, reencoded, load_pair, progress=False)


def test_calibrated_cost_model_from_engine_runs(tiny_target, mixed_draft):
    from speckv.pipeline.calibrate import calibrate

    cost = calibrate(
        tiny_target, mixed_draft, PROMPTS[:2], gamma_max=3, new_tokens=12, repeats=1, progress=False
    )
    assert isinstance(cost, CostModel) and cost.gamma_max == 3
    assert cost.t_draft_s > 0 and all(t > 0 for t in cost.t_verify_s)
    assert cost.step_times().shape == (4,)
    frame = pd.DataFrame({"k": range(1, 5), "t": cost.t_verify_s})
    assert frame["t"].notna().all()
