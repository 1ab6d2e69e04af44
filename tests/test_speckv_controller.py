"""The SpecKV controller: decisions worked out by hand, training, save/load, lossless in the engine."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import loaded, perturbed_copy

from speckv.controllers import make_controller
from speckv.controllers.predictor import AcceptancePredictor
from speckv.controllers.speckv import (
    ControllerModels,
    SpecKVController,
    context_features,
    paper_features,
    token_features,
)
from speckv.controllers.speckv_variants import SpecKVPaperController
from speckv.costs import CostModel
from speckv.decoding.engine import SpeculativeDecoder
from speckv.errors import SpecKVError
from speckv.pipeline.profiling import record_trace
from speckv.pipeline.replay import replay
from speckv.pipeline.training import train_controller, training_rows
from speckv.records import StepRecord, TokenSignals

LEVELS = ("fp32", "int8")
# A step drafting γ tokens costs 10 + γ: flat verification, one unit per drafted token.
FLAT = CostModel("fp32", t_draft_s=1.0, t_verify_s=[10.0] * 9)
PROMPTS = [[7, 3, 9, 11, 2], [5], list(range(2, 20)), [4, 4, 8], [30, 31, 2, 9], [12, 40, 41, 6]]


def constant(value: float, features, gamma_slope: float = 0.0) -> AcceptancePredictor:
    """A linear predictor returning `value` (+ slope·γ when `gamma` is a feature)."""
    weights = np.zeros((len(features), 1))
    if gamma_slope:
        weights[list(features).index("gamma"), 0] = gamma_slope
    document = AcceptancePredictor("linear", features)
    document._weights = [(weights, np.array([value]))]
    return document


def hand_models(accept: float = 0.5, paper_slope: float = -0.09) -> ControllerModels:
    return ControllerModels(
        compressions=LEVELS,
        gamma_max=8,
        token_model=constant(accept, token_features(LEVELS)),
        prior_model=constant(accept, context_features(LEVELS)),
        paper_model=constant(1.0, paper_features(LEVELS), paper_slope),
        costs={"fp32": FLAT, "int8": dataclasses.replace(FLAT, compression="int8", t_draft_s=100.0)},
    )


def test_step_choice_by_hand():
    # a = 0.5, λ = 0.14: E(γ) − λ·time = 1.5 − 1.54, 1.75 − 1.68, 1.875 − 1.82, 1.9375 − 1.96 … → γ = 2.
    controller = SpecKVController(hand_models(), "fp32", gamma_max=8, per_token=False)
    assert controller.begin_step() == 2
    # At int8 a drafted token costs 100: no drafting pays, so steps are plain target steps, with a
    # one-token probe after 8 of them in a row (nothing is observed without drafting).
    for per_token in (False, True):
        controller = SpecKVController(hand_models(), "int8", gamma_max=8, per_token=per_token)
        assert [controller.begin_step() for _ in range(9)] == [0] * 7 + [1, 0]


def test_per_token_stop_by_hand():
    controller = SpecKVController(hand_models(), "fp32", gamma_max=8)
    assert controller.begin_step() == 8  # a budget only: it decides token by token
    # After token 1: P = 0.5; one more token adds 0.5·0.5 = 0.25 expected tokens for λ·1 = 0.14.
    assert controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5))
    # After token 2: P = 0.25; one more adds 0.125 < 0.14, two more 0.1875 < 0.28, …: stop.
    assert not controller.continue_drafting(TokenSignals(2, 1.0, 0.5, 0.5))


def test_verify_count_by_hand():
    # a = 0.5 per token, λ = 0.14; four tokens drafted: E[tokens] verifying j = 0..4 is
    # 1, 1.5, 1.75, 1.875, 1.9375.
    record = StepRecord(0, 4, 0, 0, 0, [1.0] * 4, [0.5] * 4, [0.5] * 4, drafted=4)
    models = hand_models()
    for t_verify, expected in [
        ([10.0] * 9, 4),  # flat: verifying more is free, keep all
        ([10.0] + [20.0] * 8, 0),  # any drafted token doubles the pass: 1 − 1.4 beats 1.9375 − 2.8
        ([10.0, 12.0, 12.0, 30.0, 30.0] + [30.0] * 4, 2),  # 1.75 − 1.68 beats 1 − 1.4 and 1.875 − 4.2
    ]:
        models.costs["fp32"] = CostModel("fp32", t_draft_s=1.0, t_verify_s=t_verify)
        controller = SpecKVController(models, "fp32", gamma_max=8)
        controller.begin_step()
        controller.continue_drafting(TokenSignals(1, 1.0, 0.5, 0.5))  # seen while drafting…
        assert controller.verify_count(record) == expected  # …the other three read from the record


def test_paper_variant_maximises_tokens_per_step():
    # â(γ) = 1 − 0.09γ: scores 2.64, 3.56, 3.76, 3.24 for γ = 2, 4, 6, 8.
    assert SpecKVPaperController(hand_models(), "fp32", gamma_max=8).begin_step() == 6


def test_sequence_context_tracks_acceptance():
    controller = SpecKVController(hand_models(), "fp32", gamma_max=8)
    record = StepRecord(0, 4, 4, 2, 3, [1.0, 2.0, 3.0, 4.0], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6])
    controller.end_step(record)
    first, recent, last, *_, max_entropy, min_confidence = controller.context.values
    # Observed: accepted, accepted, rejected (token 4 is never judged). EMA 0.3 from 0.5.
    assert first == 0.0 and last == 0.5 and max_entropy == 4.0 and min_confidence == 0.6
    assert recent == pytest.approx(((0.5 + 0.3 * 0.5) * 0.7 + 0.3) * 0.7)
    controller.reset()
    assert controller.context.values[0] == 1.0


def test_spec_parsing_and_errors(tmp_path):
    path = hand_models().save(tmp_path / "ctrl.json")
    controller = make_controller(f"speckv-step:{path}@int8")
    assert isinstance(controller, SpecKVController) and controller.begin_step() == 0
    assert make_controller(f"speckv-step:{path}", compression="fp32").begin_step() == 2
    assert isinstance(make_controller(f"speckv-paper:{path}"), SpecKVPaperController)
    with pytest.raises(SpecKVError, match="not nf4"):
        make_controller(f"speckv:{path}@nf4")
    with pytest.raises(SpecKVError, match="not found"):
        make_controller(f"speckv:{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpecKVError, match="not a version-1"):
        make_controller(f"speckv:{tmp_path / 'bad.json'}")


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    draft = loaded(perturbed_copy(tiny_target.model, seed=2, noise=0.004), "mixed")
    traces = []
    for level in LEVELS:  # the same model under two names: the level is only a feature here
        for i, prompt in enumerate(PROMPTS):
            trace = record_trace(tiny_target, draft, prompt, 32, 8, eos_token_ids=())
            trace.prompt_id, trace.task, trace.compression = f"chat/{i}", "chat", level
            traces.append(trace)
    costs = {level: dataclasses.replace(FLAT, compression=level, t_draft_s=0.5) for level in LEVELS}
    result = train_controller(traces, costs, kind="mlp16", compare_kinds=("linear",))
    path = result.models.save(tmp_path_factory.mktemp("ctrl") / "speckv.json")
    return draft, traces, result, path


def test_training_rows_follow_the_replayed_steps(trained):
    _, traces, _, _ = trained
    tokens, steps = training_rows(traces[:1], LEVELS, gammas=(4,))
    run = replay(traces[0], make_controller("fixed:4"), keep_records=True)
    judged = [r for r in run.records if r.gamma]
    assert len(steps) == len(judged)
    assert len(tokens) == sum(min(r.accepted + 1, r.gamma) for r in judged)
    assert tokens["accepted"].sum() == sum(r.accepted for r in judged)
    assert (tokens["comp_fp32"] == 1).all()


def test_training_reports_every_kind_and_saves_a_small_file(trained):
    _, _, result, path = trained
    assert list(result.metrics["kind"]) == ["mlp16", "linear"]
    assert result.metrics["auc"].between(0, 1).all()
    assert path.stat().st_size < 64 * 1024
    models = ControllerModels.load(path)
    assert models.info["token_rows"] > 0 and models.info["calibration"]
    assert "rates" not in json.loads(path.read_text())  # λ is derived where the controller runs
    for level in LEVELS:  # replayed on the training prompts, it keeps up with the best baseline
        fitted = models.info["rates"][level]
        assert fitted["achieved"] >= 0.95 * max(fitted["best_fixed"], fitted["target_only"])


@pytest.mark.parametrize("variant", ["speckv", "speckv-step", "speckv-paper"])
def test_loaded_controller_decides_alike_and_stays_lossless(tiny_target, trained, variant):
    draft, traces, result, path = trained
    spec = f"{variant}:{path}"
    original = (
        SpecKVPaperController(result.models, "fp32", 8)
        if variant == "speckv-paper"
        else SpecKVController(result.models, "fp32", 8, per_token=variant == "speckv")
    )
    # One controller per stream of sequences, in both: what it learnt of one sequence carries
    # into the next (the acceptance calibration keeps half its evidence).
    loaded_controller = make_controller(spec)
    for trace in traces[:3]:
        assert replay(trace, original).gammas == replay(trace, loaded_controller).gammas
    live_controller = make_controller(spec)
    live_controller.follow_costs = False  # decide on the modelled costs, as replay does
    decoder = SpeculativeDecoder(tiny_target, draft, live_controller, eos_token_ids=())
    target_only = SpeculativeDecoder(tiny_target, eos_token_ids=())
    replaying = make_controller(spec)
    for prompt, trace in zip(PROMPTS[:3], traces[:3], strict=True):
        live = decoder.generate(prompt, 32)
        assert live.token_ids == target_only.generate(prompt, 32).token_ids
        replayed = replay(trace, replaying, keep_records=True)
        assert [(s.gamma, s.accepted) for s in live.steps] == [
            (s.gamma, s.accepted) for s in replayed.records
        ]


def test_generate_cli_with_a_trained_controller(capsys, tiny_model_dirs, trained):
    from speckv.cli import main

    path = trained[3]
    common = [
        "generate",
        "--target",
        str(tiny_model_dirs["target"]),
        "--prompt",
        "w5 w6 w7",
        "--raw",
        "--json",
        "--compression",
        "fp32",  # a level the tiny controller was trained for
    ]
    assert main([*common, "--draft", str(tiny_model_dirs["draft"]), "--controller", f"speckv:{path}"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["controller"] == "speckv"
    assert {"tokens_per_s", "mean_gamma", "acceptance_rate"} <= set(record["summary"])
    assert main([*common, "--no-draft"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == record["token_ids"]


def test_the_shipped_file_holds_no_speed_of_another_machine_but_a_named_fallback(tmp_path):
    from speckv.controllers.speckv import SHIPPED

    document = json.loads(SHIPPED.read_text())
    assert "rates" not in document and "costs" not in document and "fallback_costs" in document
    # Files written before hold `costs` and `rates`: they still load (λ is derived where it runs).
    old = {**document, "costs": document.pop("fallback_costs"), "rates": {"bf16": 13.5}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ControllerModels.load(tmp_path / "old.json").costs == ControllerModels.load(SHIPPED).costs
