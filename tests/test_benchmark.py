"""The side-by-side harness: every method decodes the same greedy tokens, tables and RESULTS sections."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, perturbed_copy

from speckv.controllers.base import Controller
from speckv.decoding.draft_files import _restrict_head
from speckv.errors import SpecKVError
from speckv.pipeline.compare import (
    Method,
    MethodResult,
    compare,
    hf_assisted_methods,
    paired_speedup,
    speedup_summary,
    speedup_table,
    write_results_section,
)


def test_compare_runs_every_method_losslessly(tiny_target, tiny_drafts):
    methods = [
        Method("target only (speckv)"),
        Method("target only (HF generate)", hf=True),
        *(Method(f"speckv fixed γ={g}", controller=f"fixed:{g}") for g in (2, 4)),
        Method("speckv heuristic", controller="heuristic"),
        Method("speckv confidence", controller="confidence"),
        *hf_assisted_methods((2, 4)),
    ]
    results = compare(
        tiny_target, tiny_drafts["close"], [[3, 4, 5], [7, 8]], methods, 10, repeats=2, progress=False
    )
    reference = results[0].outputs
    assert [r.method.name for r in results] == [m.name for m in methods]
    for result in results:
        assert result.outputs == reference, result.method.name
        assert len(result.tokens_per_s) == 2
    table = speedup_table(results)
    assert table.count("\n") == len(methods) + 1
    assert "NO" not in table


class Tally(Controller):
    """Counts the sequences it has decoded; `seen` lists the count at each sequence's start."""

    name = "tally"
    seen: list[int] = []

    def __init__(self):
        self.sequences = 0

    def reset(self):
        self.sequences += 1
        Tally.seen.append(self.sequences)

    def begin_step(self):
        return 1


@pytest.mark.parametrize("hf", [False, True])
def test_each_pass_starts_from_a_fresh_controller(tiny_target, tiny_drafts, hf):
    """A controller learns from prompt to prompt within a pass, never from an earlier pass over
    the same prompts (which would flatter a learning controller on repeats)."""
    Tally.seen = []
    method = Method("tally", hf=True, hf_controller=Tally()) if hf else Method("tally", controller=Tally())
    compare(tiny_target, tiny_drafts["close"], [[3, 4, 5], [7, 8]], [method], 6, repeats=2, progress=False)
    assert Tally.seen == [1, 1, 2, 1, 2]  # the warm-up, then two prompts per pass


def test_hf_assistant_sees_a_reduced_vocabulary_draft_like_ours(tiny_target):
    """HF's assisted generation gets the same reduced-vocabulary draft through a full-vocabulary view."""
    draft = loaded(perturbed_copy(tiny_target.model, seed=7, noise=0.01), "reduced")
    _restrict_head(draft, torch.arange(0, 40))  # the draft may only propose tokens 0..39
    methods = [
        Method("target only (speckv)"),
        *(m for m in hf_assisted_methods((3,)) if m.name == "HF assisted (γ=3)"),
    ]
    results = compare(tiny_target, draft, [[5, 6, 7]], methods, 12, repeats=1, progress=False)
    assert results[0].outputs == results[1].outputs


@pytest.mark.parametrize(
    ("method", "gamma"),
    [
        (next(m for m in hf_assisted_methods((3,)) if m.name == "HF assisted (γ=3)"), 3),
        (Method("HF + SpecKV fixed:2", hf=True, hf_controller="fixed:2"), 2),
    ],
)
def test_hf_rows_draft_what_they_name(tiny_target, tiny_drafts, method, gamma):
    """transformers reads the schedule from the assistant's own config, not from `generate`'s
    arguments: the row's draft length must reach it (its default drafts up to 20 a step)."""
    widths = []
    hook = tiny_target.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        prompt = [3, 4, 5]
        (result,) = compare(tiny_target, tiny_drafts["identical"], [prompt], [method], 16, 1, progress=False)
    finally:
        hook.remove()
    assert max(widths) == len(prompt) + gamma and gamma + 1 in widths  # the first pass reads the prompt
    if method.hf_controller:
        assert result.steps and result.drafted == result.accepted  # the identical draft: all accepted


def _timed(name: str, *repeats) -> MethodResult:
    return MethodResult(Method(name), timings=[list(run) for run in repeats])


def test_paired_speedup_pairs_the_repeats_of_rows_timed_side_by_side():
    # Repeat 0 ran on a machine twice as slow as repeat 1; the rows ran side by side in both, so
    # every resample, whatever repeats it draws, sees ours at twice the other's rate.
    ours = _timed("ours", [(10, 2.0), (30, 6.0)], [(10, 1.0), (30, 3.0)])
    other = _timed("other", [(10, 4.0), (30, 12.0)], [(10, 2.0), (30, 6.0)])
    assert paired_speedup(ours, [other]) == "2.00× (90% CI 2.00–2.00)"


def test_speedup_summary_holds_a_row_against_the_target_and_the_fastest_row_not_speckvs():
    results = [
        _timed("target only (speckv)", [(10, 1.0)]),
        _timed("fixed", [(15, 1.0)]),
        _timed("HF target", [(12, 1.0)]),
        MethodResult(Method("SpecKV", controller="speckv"), timings=[[(18, 1.0)]]),
        MethodResult(Method("HF + SpecKV", hf=True, hf_controller="speckv"), timings=[[(30, 1.0)]]),
    ]
    assert speedup_summary(results, "SpecKV") == (
        "SpecKV: 1.80× (90% CI 1.80–1.80) the target alone, 1.20× (90% CI 1.20–1.20) the fastest "
        "other row (pooled: fixed)"
    )


def test_paired_speedup_needs_rows_timed_alike():
    with pytest.raises(SpecKVError, match="same prompts and repeats"):
        paired_speedup(_timed("ours", [(10, 1.0)]), [_timed("other", [(10, 1.0), (10, 1.0)])])
    with pytest.raises(SpecKVError, match="same prompts and repeats"):
        paired_speedup(_timed("ours", [(10, 1.0)]), [])
    with pytest.raises(SpecKVError, match="same prompts and repeats"):
        paired_speedup(_timed("ours"), [_timed("other")])  # nothing timed


def test_compare_keeps_every_repeats_timings(tiny_target, tiny_drafts):
    (result,) = compare(
        tiny_target,
        tiny_drafts["close"],
        [[3, 4, 5], [7, 8]],
        [Method("fixed", "fixed:2")],
        6,
        2,
        progress=False,
    )
    assert [[n for n, _ in run] for run in result.timings] == [[6, 6], [6, 6]]
    assert result.pooled_tokens_per_s == pytest.approx(24 / sum(s for run in result.timings for _, s in run))


def test_write_results_section_replaces_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_results_section(path, "a", "first")
    write_results_section(path, "b", "second")
    write_results_section(path, "a", "third")
    text = path.read_text()
    assert "first" not in text and text.index("third") < text.index("second")
