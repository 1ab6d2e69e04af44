"""SpecKV sizing token trees: the tree model's rows, its decisions by hand, lossless in the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import loaded, perturbed_copy
from test_engine import reference_greedy
from test_speckv_controller import LEVELS, PROMPTS, constant, hand_models

from speckv.controllers import Drafts, make_controller
from speckv.controllers.speckv import ControllerModels, SpecKVController, tree_features
from speckv.costs import CostModel
from speckv.decoding.drafters import ModelDrafter, ModelTreeDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.errors import SpecKVError
from speckv.pipeline.profiling import record_trace
from speckv.pipeline.training import is_validation
from speckv.pipeline.tree_training import fit_tree_model, tree_rows
from speckv.records import StepRecord, TokenSignals


class _Branching:
    branches = True


def tree_models(
    accept: float = 0.5, t_verify=None, other: float | None = None, t_draft: float = 1.0
) -> ControllerModels:
    """P(node accepted | parent accepted) = `accept`, or `other` for nodes not their parent's top choice."""
    models = hand_models(accept)
    models.tree_model = constant(accept if other is None else other, tree_features(LEVELS))
    if other is not None:
        models.tree_model._weights[0][0][-1, 0] = accept - other  # the top_choice feature
    if t_verify is not None:
        models.costs["fp32"] = CostModel("fp32", t_draft_s=t_draft, t_verify_s=t_verify)
    return models


#      root
#     /    \
#   n0      n1        reach with P = 0.5 per node: 0.5, 0.5, 0.25, 0.25
#   / \
# n2   n3
TREE = StepRecord(
    0, 4, 0, 0, 0, [1.0] * 4, [0.6] * 4, [0.6, 0.3, 0.6, 0.3], drafted=4, parents=[-1, -1, 0, 0]
)


@pytest.mark.parametrize(
    ("t_verify", "expected"),
    [
        ([10.0] * 9, 4),  # flat: E[tokens] 1, 1.5, 2, 2.25, 2.5 for 0..4 nodes, all nearly free
        ([10.0, 12.0, 12.0, 30.0, 30.0] + [30.0] * 4, 2),  # 2 − 1.68 beats 1.5 − 1.68 and 2.25 − 4.2
        ([10.0] + [30.0] * 8, 0),  # any node triples the pass: 1 − 1.4 beats 2.5 − 4.2
    ],
)
def test_tree_verify_count_by_hand(t_verify, expected):
    controller = SpecKVController(tree_models(t_verify=t_verify), "fp32", gamma_max=8)
    controller.bind(_Branching())
    controller.begin_step()
    assert controller.verify_count(TREE) == expected


def test_tree_drafting_stops_when_a_node_no_longer_pays():
    # P = 0.5 per node, λ = 0.14, t_draft 1, flat verification: a node must reach > 0.14.
    controller = SpecKVController(tree_models(), "fp32", gamma_max=8)
    assert controller.drafts is Drafts.EITHER
    controller.bind(_Branching())
    assert controller.begin_step() == 8  # the widest tree the cost model measured
    assert controller.continue_drafting(TokenSignals(1, 1.0, 0.6, 0.6, parent=-1))  # reach 0.5
    assert controller.continue_drafting(TokenSignals(2, 1.0, 0.6, 0.3, parent=-1))  # a sibling: 0.5
    assert controller.continue_drafting(TokenSignals(3, 1.0, 0.6, 0.6, parent=0))  # 0.25
    assert controller.continue_drafting(TokenSignals(4, 1.0, 0.6, 0.3, parent=2))  # 0.125, a side node
    assert not controller.continue_drafting(TokenSignals(5, 1.0, 0.6, 0.6, parent=2))  # 0.125, top choice
    # a chain drafter bound instead: the chain plan again (per-token reach 0.5, 0.25, 0.125)
    controller.bind(ModelDrafter.__new__(ModelDrafter))
    assert controller.begin_step() == 8 and controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5))


def test_tree_mode_needs_a_tree_model_and_a_branching_drafter(tmp_path):
    chain_only = SpecKVController(hand_models(), "fp32", gamma_max=8)
    chain_only.bind(_Branching())
    assert chain_only.drafts is Drafts.CHAINS and not chain_only._branching
    path = tree_models().save(tmp_path / "ctrl.json")
    assert ControllerModels.load(path).tree_model is not None
    assert make_controller(f"speckv:{path}").drafts is Drafts.EITHER
    assert make_controller(f"speckv-step:{path}").drafts is Drafts.CHAINS
    document = tree_models()
    document.tree_model = constant(0.5, ("entropy",))
    document.save(tmp_path / "bad.json")
    with pytest.raises(SpecKVError, match="tree model does not take the features"):
        make_controller(f"speckv:{tmp_path / 'bad.json'}")


@pytest.mark.parametrize("t_verify", [[10.0] * 9, [10.0, 12.0, 12.0, 30.0, 30.0] + [30.0] * 4])
def test_speckv_trees_stay_lossless_and_size_by_the_cost_curve(tiny_target, tiny_drafts, t_verify):
    controller = SpecKVController(tree_models(0.6, t_verify, 0.05, t_draft=0.1), "fp32", gamma_max=8)
    drafter = ModelTreeDrafter(tiny_drafts["close"])
    decoder = SpeculativeDecoder(tiny_target, drafter, controller, eos_token_ids=())
    verified = []
    for prompt in PROMPTS[:3]:
        result = decoder.generate(prompt, 24)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 24)
        verified += [step.gamma for step in result.steps if step.drafted]
        assert all(step.gamma == len(step.parents) for step in result.steps)
    # flat verification and cheap drafting: 8 nodes (0.6⁸ > λ·0.1); on the steep curve a third
    # node (reach ≤ 0.6³, or 0.05 off the top path) can never pay for λ·(30 − 12) = 2.5
    assert max(verified) == (8 if t_verify[3] == 10.0 else 2)


@pytest.fixture(scope="module")
def traces(tiny_target):
    draft = loaded(perturbed_copy(tiny_target.model, seed=2, noise=0.004), "mixed")
    out = []
    for level in LEVELS:
        for i, prompt in enumerate(PROMPTS):
            trace = record_trace(tiny_target, draft, prompt, 24, 8, eos_token_ids=())
            trace.prompt_id, trace.task, trace.compression = f"chat/{i}", "chat", level
            out.append(trace)
    return draft, out


def test_tree_rows_label_the_draft_candidates_against_the_target(traces):
    draft, chosen = traces
    prompts = {f"chat/{i}": prompt for i, prompt in enumerate(PROMPTS)}
    rows = tree_rows(chosen[:2], prompts, draft, LEVELS, top_k=3, progress=False)
    trace = chosen[0]
    assert len(rows) == 3 * (trace.n_tokens + chosen[1].n_tokens)
    first = rows[rows["prompt_id"] == trace.prompt_id]
    with torch.no_grad():  # an independent pass: the top 3 after each prefix of the continuation
        logits = draft.model(torch.tensor([PROMPTS[0] + trace.tokens[:-1]])).logits[0, len(PROMPTS[0]) - 1 :]
    candidates = logits.float().softmax(-1).topk(3).indices
    expected = (candidates == torch.tensor(trace.tokens)[:, None]).reshape(-1).float().numpy()
    assert np.array_equal(first["accepted"].to_numpy(), expected)
    assert (first["top_choice"].to_numpy().reshape(-1, 3) == [1, 0, 0]).all()
    assert (first["comp_fp32"] == 1).all()
    # the sequence context a controller has at each position: the first step's, then later ones
    assert (first["first_step"].iloc[:3] == 1).all() and (first["first_step"].iloc[-3:] == 0).all()


def test_fit_tree_model_is_calibrated_on_held_out_prompts(traces):
    draft, chosen = traces
    prompts = {f"chat/{i}": prompt for i, prompt in enumerate(PROMPTS)}
    rows = tree_rows(chosen, prompts, draft, LEVELS, progress=False)
    validation = rows["prompt_id"].map(is_validation).to_numpy()
    model, scores = fit_tree_model(rows, LEVELS, validation, "linear")
    assert tuple(model.feature_names) == tree_features(LEVELS)
    # the top choice is accepted far more often than the other candidates, and the model knows it
    assert scores["base_rate_top_choice"] > 0.5 > scores["base_rate_other"]
    top = rows[rows["top_choice"] == 1].head(50)
    other = rows[rows["top_choice"] == 0].head(50)
    assert model.predict(top).mean() > model.predict(other).mean() + 0.3
    assert scores["auc"] > 0.8


def test_sampling_with_speckv_trees_follows_the_target_distribution():
    """Where SpecKV stops a tree depends on the draft's signals only, so sampling stays exact (χ²)."""
    from conftest import SMALL_VOCAB, chi_square_p, exact_first_two, tiny_model

    from speckv.decoding.verify import SamplingConfig

    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-draft")
    exact = exact_first_two(target.model, [3, 1], SamplingConfig(1.0))
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    drafter = ModelTreeDrafter(draft, top_k=2)
    sizes = set()
    for seed in range(1200):
        controller = SpecKVController(tree_models(0.6, [10.0] * 9, 0.2, t_draft=0.5), "fp32", gamma_max=8)
        decoder = SpeculativeDecoder(target, drafter, controller, SamplingConfig(1.0, seed=seed), ())
        result = decoder.generate([3, 1], 3)
        counts[result.token_ids[0], result.token_ids[1]] += 1
        sizes.update(step.gamma for step in result.steps if step.drafted)
    assert len(sizes) > 1  # the controller sized the trees differently from step to step
    assert chi_square_p(counts, exact) > 1e-3
