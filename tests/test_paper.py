"""speckv paper: the protocol's scoring, the audit's replay and cost model, and both commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speckv.cli import main
from speckv.controllers.predictor import AcceptancePredictor
from speckv.errors import SpecKVError
from speckv.paper import reproduce
from speckv.paper.cost import fit_paper_cost_model, step_seconds
from speckv.paper.data import ORACLE_FILE, REQUIRED_COLUMNS, RUN_FILE, STEP_FILE, load_paper_data
from speckv.paper.prompts import recover_prompts
from speckv.paper.protocol import (
    PAPER_FEATURES,
    best_gamma,
    candidate_scores,
    fixed_best_gamma,
    paper_expected_tokens,
    task_oracle_gamma,
)
from speckv.paper.replay import logged_replay_consistency, replayed_tokens
from speckv.util import reporting as report

PAPER_DATA = Path(__file__).parents[2] / "shared" / "paper-data"
needs_data = pytest.mark.skipif(
    not (PAPER_DATA / STEP_FILE).is_file(),
    reason=f"the SpecKV paper's released CSVs are not at {PAPER_DATA}",
)


def fixed_predictor(tmp_path: Path, gamma_weight: float, min_confidence_weight: float, bias: float):
    """A linear predictor with hand-set weights: bias + w_γ·γ + w_c·min_draft_confidence."""
    weights = [[0.0], [0.0], [0.0], [min_confidence_weight], [0.0], [gamma_weight]]
    path = tmp_path / "predictor.json"
    document = {
        "format": "speckv-acceptance-predictor",
        "version": 1,
        "kind": "linear",
        "feature_names": PAPER_FEATURES,
        "sklearn_version": "hand-written",
        "layers": [{"weights": weights, "bias": [bias]}],
    }
    path.write_text(json.dumps(document))
    return AcceptancePredictor.load(path)


def step_rows(min_confidence: list[float]) -> pd.DataFrame:
    """Steps with the paper's features; only min_draft_confidence varies."""
    n = len(min_confidence)
    return pd.DataFrame(
        {
            "mean_draft_entropy": np.ones(n),
            "mean_draft_confidence": np.ones(n),
            "max_draft_entropy": np.ones(n),
            "min_draft_confidence": min_confidence,
            "comp_enc": np.zeros(n),
            "gamma": np.full(n, 4.0),
        }
    )


def test_paper_score_and_speckv_choice(tmp_path):
    # Predicted acceptance 1 − 0.1·γ; score = clip(1 − 0.1γ)·γ + 1:
    # γ=2: 0.8·2 + 1 = 2.6, γ=4: 0.6·4 + 1 = 3.4, γ=6: 0.4·6 + 1 = 3.4, γ=8: 0.2·8 + 1 = 2.6.
    predictor = fixed_predictor(tmp_path, gamma_weight=-0.1, min_confidence_weight=0.0, bias=1.0)
    scores = candidate_scores(predictor, step_rows([0.5]))
    assert np.allclose(scores, [[2.6, 3.4, 3.4, 2.6]])
    # The tie between γ=4 and γ=6 goes to the smaller γ.
    assert best_gamma(scores).tolist() == [4]


def test_paper_score_clips_and_keeps_the_rows_signals(tmp_path):
    # Predicted acceptance = min_draft_confidence, whatever γ is substituted.
    predictor = fixed_predictor(tmp_path, gamma_weight=0.0, min_confidence_weight=1.0, bias=0.0)
    rows = step_rows([0.5, 0.0, 1.7])
    # Row 1: 0.5·γ + 1 grows with γ -> γ=8 scores 5. Row 2: 0·γ + 1 = 1 for every γ -> tie -> γ=2.
    # Row 3: 1.7 is clipped to 1 -> γ + 1 -> γ=8 scores 9.
    assert np.allclose(paper_expected_tokens(predictor, rows, 8), [5.0, 1.0, 9.0])
    assert best_gamma(candidate_scores(predictor, rows)).tolist() == [8, 2, 8]
    # Per-row γ: 0.5·2 + 1 = 2, 0·4 + 1 = 1, 1·6 + 1 = 7.
    assert np.allclose(paper_expected_tokens(predictor, rows, [2, 4, 6]), [2.0, 1.0, 7.0])


def test_fixed_best_and_task_oracle():
    steps = pd.DataFrame(
        {
            "compression": ["fp16"] * 4 + ["nf4"] * 2,
            "gamma": [2, 2, 8, 8, 2, 4],
            "tokens_produced": [3, 3, 9, 1, 3, 2],
        }
    )
    # fp16: γ=2 mean 3, γ=8 mean 5 -> 8. nf4: γ=2 mean 3, γ=4 mean 2 -> 2.
    assert fixed_best_gamma(steps) == {"fp16": 8, "nf4": 2}
    oracle = pd.DataFrame({"compression": ["fp16", "nf4"], "task": ["code", "code"], "optimal_gamma": [2, 6]})
    rows = pd.DataFrame({"compression": ["nf4", "fp16"], "task": ["code", "code"]})
    assert task_oracle_gamma(rows, oracle).tolist() == [6, 2]
    with pytest.raises(SpecKVError, match="no optimal γ"):
        task_oracle_gamma(pd.DataFrame({"compression": ["int8"], "task": ["chat"]}), oracle)


def test_replayed_tokens_under_greedy_decoding():
    accepted = [3, 3, 1, 2, 2]
    logged = [8, 8, 2, 2, 2]
    chosen = [2, 4, 8, 2, 4]
    # 3 of 8 accepted, γ'=2: min(3, 2) + 1 = 3. γ'=4: the 4th token was rejected -> 3 + 1 = 4.
    # 1 of 2 accepted, γ'=8: rejected at token 2 whatever γ' is -> 2. 2 of 2 at γ'=2: 3.
    # 2 of 2 accepted, γ'=4: tokens 3-4 were never drafted -> unknown.
    replayed = replayed_tokens(accepted, logged, chosen)
    assert replayed[:4].tolist() == [3.0, 4.0, 2.0, 3.0]
    assert np.isnan(replayed[4])


def test_cost_model_recovers_known_costs():
    # elapsed = steps·(20 ms + γ·10 ms) exactly.
    runs = pd.DataFrame(
        {
            "compression": ["fp16"] * 4,
            "gamma": [2, 4, 6, 8],
            "num_steps": [30, 21, 17, 15],
            "num_tokens": [80, 80, 80, 80],
        }
    )
    runs["elapsed_sec"] = runs["num_steps"] * (0.020 + runs["gamma"] * 0.010)
    runs["tokens_per_sec"] = runs["num_tokens"] / runs["elapsed_sec"]
    cost = fit_paper_cost_model(runs).iloc[0]
    assert cost["t_verify_ms"] == pytest.approx(20.0)
    assert cost["t_draft_ms"] == pytest.approx(10.0)
    assert cost["r2_elapsed"] == pytest.approx(1.0)
    # A γ=4 step then takes 20 + 4·10 = 60 ms.
    rows = pd.DataFrame({"compression": ["fp16"]})
    assert step_seconds(rows, [4], fit_paper_cost_model(runs)) == pytest.approx([0.060])


def test_logged_replay_consistency_counts_conflicting_positions():
    # One prompt, two runs. γ=2: step at 0 accepts 2 (positions 0, 1 match; 2 is the bonus
    # token, unseen), step at 3 accepts 0 (position 3 mismatches). γ=4: step at 0 accepts 2
    # (0, 1 match, 2 mismatches), step at 3 accepts 1 (3 matches, 4 mismatches).
    # Seen by both runs: 0, 1 (agree) and 3 (conflict) -> 3 positions, 1 conflict.
    steps = pd.DataFrame(
        {
            "run": [0, 0, 1, 1],
            "compression": ["fp16"] * 4,
            "prompt": ["code-1"] * 4,
            "gamma": [2, 2, 4, 4],
            "accepted": [2, 0, 2, 1],
            "tokens_produced": [3, 1, 3, 2],
        }
    )
    table = logged_replay_consistency(steps).iloc[0]
    assert table["positions_seen_by_2+_runs"] == 3
    assert table["positions_in_conflict"] == 1
    assert table["prompts_where_all_runs_agree"] == 0


def test_recover_prompts_matches_blocks_to_runs():
    steps = pd.DataFrame(
        {
            "compression": ["fp16"] * 5,
            "gamma": [2] * 5,
            "task": ["code"] * 5,
            "step": [0, 1, 0, 1, 2],
            "acceptance_rate": [1.0, 0.5, 0.0, 0.5, 1.0],
            "tokens_produced": [3, 2, 1, 2, 3],
            "mean_draft_entropy": [0.1] * 5,
            "mean_draft_confidence": [0.9] * 5,
        }
    )
    runs = pd.DataFrame(
        {
            "compression": ["fp16"] * 2,
            "gamma": [2, 2],
            "task": ["code"] * 2,
            "prompt": ["first prompt", "second prompt"],
            "num_tokens": [5, 6],
            "num_steps": [2, 3],
            "mean_acceptance_rate": [0.75, 0.5],
            "mean_draft_entropy": [0.1, 0.1],
            "mean_draft_confidence": [0.9, 0.9],
        }
    )
    recovered, checks = recover_prompts(steps, runs)
    assert recovered["prompt"].tolist() == ["code-1"] * 2 + ["code-2"] * 3
    assert (checks["runs_passing"] == 2).all()
    with pytest.raises(SpecKVError, match="cannot recover prompts"):
        recover_prompts(steps, runs.iloc[:1])


@needs_data
@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (None, None, "not found"),
        (ORACLE_FILE, "delete", "missing phase2_optimal_gamma.csv"),
        (STEP_FILE, lambda f: f.drop(columns="accepted"), "missing columns"),
        (
            STEP_FILE,
            lambda f: f.assign(gamma=f["gamma"].astype(str).replace("4", "four")),
            "non-numeric",
        ),
        (RUN_FILE, lambda f: f.assign(compression="fp8"), "unknown compression"),
        (ORACLE_FILE, lambda f: f.assign(optimal_gamma=3), "outside"),
        (ORACLE_FILE, lambda f: f.iloc[1:], "no optimal γ for fp16 code"),
        (RUN_FILE, lambda f: f[f["gamma"] != 6], r"no rows for fp16 γ=6 \(every task\)"),
        # Cut at a line boundary: every cell is there, but the last run lacks its final steps.
        (STEP_FILE, lambda f: f.iloc[:-10], "steps for nf4 γ=8 summarization where"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, file, edit, message):
    data_dir = tmp_path / "data"
    if file is not None:
        data_dir.mkdir()
        for name in REQUIRED_COLUMNS:
            frame = pd.read_csv(PAPER_DATA / name)
            if name == file and edit == "delete":
                continue
            (edit(frame) if name == file else frame).to_csv(data_dir / name, index=False)
    with pytest.raises(SpecKVError, match=message):
        load_paper_data(data_dir)


@needs_data
@pytest.mark.parametrize("action", ["reproduce", "audit"])
def test_a_step_file_cut_short_is_rejected_by_both_commands(tmp_path, capsys, action):
    # `head -c 100000` of the step file (issue #15): all of fp16, part of int8 at γ=2, no nf4.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in REQUIRED_COLUMNS:
        (data_dir / name).write_bytes((PAPER_DATA / name).read_bytes())
    (data_dir / STEP_FILE).write_bytes((PAPER_DATA / STEP_FILE).read_bytes()[:100_000])
    out = tmp_path / "out"
    assert main(["paper", action, "--data", str(data_dir), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"speckv: error: {data_dir / STEP_FILE} is incomplete: no rows for "
        "int8 γ=4, 6, 8 (every task), γ=2 (chat, summarization); nf4 (every γ and task)"
    ]
    assert not out.exists()


def read_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {path.stem: pd.read_csv(path) for path in sorted((out_dir / "tables").glob("*.csv"))}


@needs_data
def test_reproduce_writes_the_protocol_tables_deterministically(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["paper", "reproduce", "--data", str(PAPER_DATA), "--out", str(first), "--seed", "3"]) == 0
    assert "SpecKV − Fixed-4" in capsys.readouterr().out
    reproduce(PAPER_DATA, second, seed=3)

    tables = read_tables(first)
    policies = ["Fixed-4", "Fixed-best", "Task-oracle", "SpecKV"]
    assert tables["policy_overall"]["policy"].tolist() == policies
    assert set(tables["policy_overall"].columns) >= {"mean", "ci_low", "ci_high", "n_steps"}
    assert tables["policy_overall"]["n_steps"].unique().tolist() == [1023]  # 20% of 5,112 rows
    assert len(tables["policy_by_compression"]) == 3 * len(policies)
    assert len(tables["policy_by_compression_task"]) == 12 * len(policies)
    assert tables["speckv_vs_fixed4"]["compression"].tolist() == ["all", "fp16", "int8", "nf4"]
    assert tables["predictor_accuracy"]["predictor"].tolist() == ["MLP-16", "MLP-16", "RF-100", "RF-100"]
    overall = tables["policy_overall"]
    assert ((overall["ci_low"] <= overall["mean"]) & (overall["mean"] <= overall["ci_high"])).all()
    overhead = tables["decision_overhead"].set_index("path")
    assert overhead["same_gamma_share"].eq(1.0).all()

    report_text = (first / "report.md").read_text()
    for figure in ("policy_by_compression", "speckv_gamma_choice", "predicted_vs_actual"):
        assert (first / "figures" / f"{figure}.png").is_file()
        assert f"figures/{figure}.png" in report_text

    # Same seed, same numbers (timings excepted).
    repeated = read_tables(second)
    for name, table in tables.items():
        if name != "decision_overhead":
            pd.testing.assert_frame_equal(table, repeated[name])


@needs_data
def test_audit_writes_every_section(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["paper", "audit", "--data", str(PAPER_DATA), "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    tables = read_tables(out)
    alignment = tables["prompt_alignment"]
    assert (alignment["runs_passing"] <= alignment["runs"]).all()
    assert alignment["runs"].eq(240).all()
    assert len(tables["conclusions"]) == 7
    assert tables["conclusions"]["verdict"].str.len().gt(0).all()
    assert set(tables["policy_replay"]["compression"]) == {"fp16", "int8", "nf4"}
    observed = tables["fixed_gamma_observed"]
    pooled = observed[observed["compression"] == "all"]
    # Replaying the γ=8 runs at γ=8 is exactly what they produced.
    at_eight = pooled[pooled["gamma"] == 8].iloc[0]
    assert at_eight["replayed_from_gamma_8"] == pytest.approx(at_eight["observed_tokens_per_step"])
    report_text = (out / "report.md").read_text()
    for heading in ("## Conclusions", "## Scoring", "## Leakage", "## Train/test hygiene", "## Cost"):
        assert heading in report_text


def test_markdown_tables_round_floats_blank_missing_values_and_escape_pipes():
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [1.23456, np.nan], "count": [3, 4]})
    assert report.markdown_table(frame, digits=2).splitlines() == [
        "| name | value | count |",
        "|---|---|---|",
        "| a\\|b | 1.23 | 3 |",
        "| c |  | 4 |",
    ]
