"""The side-by-side harness: every method decodes the same greedy tokens, tables and RESULTS sections."""

from __future__ import annotations

import torch
from conftest import loaded, perturbed_copy

from speckv.decoding.draft_files import _restrict_head
from speckv.pipeline.compare import Method, compare, hf_assisted_methods, speedup_table, write_results_section


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


def test_write_results_section_replaces_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_results_section(path, "a", "first")
    write_results_section(path, "b", "second")
    write_results_section(path, "a", "third")
    text = path.read_text()
    assert "first" not in text and text.index("third") < text.index("second")
