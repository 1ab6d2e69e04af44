"""`speckv paper audit`: the released data evaluated honestly, with its report and summary.

Policies are scored by replaying logged steps (observed outcomes, not the predictor's own
prediction), predictors also get signals that exist before γ is chosen, models are fitted and
evaluated with whole prompts held out, and speed is judged in modelled tokens per second.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from speckv.paper.claims import conclusions
from speckv.paper.cost import (
    best_gamma_table,
    fastest_fixed_gamma_out_of_fold,
    fit_paper_cost_model,
    gamma_speed_table,
    step_seconds,
)
from speckv.paper.data import GAMMAS, RUN_FILE, STEP_FILE, load_paper_data
from speckv.paper.leakage import (
    FEATURE_SETS,
    PREVIOUS_STEP,
    SAME_STEP,
    add_previous_step_signals,
    hygiene_table,
    leakage_accuracy,
    signal_correlations,
    signals_by_gamma,
)
from speckv.paper.prompts import fit_prompt_folds, out_of_fold, recover_prompts
from speckv.paper.protocol import (
    PAPER_PREDICTORS,
    best_gamma,
    candidate_scores,
    fixed_best_gamma,
    run_protocol,
    task_oracle_gamma,
)
from speckv.paper.replay import (
    logged_replay_consistency,
    replay_bias_table,
    replay_rows,
    replayed_policy_outcomes,
    replayed_speed_vs_baseline,
)
from speckv.paper.results import CI_RESAMPLES, CommandResult, ci_text, format_p, pivot_with_ci, single_row
from speckv.paper.scoring import fixed_gamma_observed, scoring_comparison
from speckv.util import reporting as report

# The baseline the adaptive policies must beat in tokens per second.
FASTEST_FIXED = "Fixed-best (tokens/s)"


def audit(data_dir: str | Path, out_dir: str | Path = "paper-audit", seed: int = 42) -> CommandResult:
    """Re-evaluate the released data honestly and write tables, figures and report.md."""
    data = load_paper_data(data_dir)
    steps, alignment = recover_prompts(data.steps, data.runs)
    steps = add_previous_step_signals(steps)
    data = replace(data, steps=steps)
    protocol = run_protocol(data)
    cost = fit_paper_cost_model(data.runs)
    speed = gamma_speed_table(steps, data.runs, cost)
    folds = {
        (feature_set, predictor): fit_prompt_folds(steps, kind, features)
        for feature_set, features in FEATURE_SETS.items()
        for predictor, kind in PAPER_PREDICTORS.items()
    }
    policy_gammas = audit_policy_gammas(steps, folds, cost, data.optimal_gamma)
    on_replay = (steps["gamma"] == max(GAMMAS)).to_numpy()
    replay = steps[on_replay]
    replay_gammas = {policy: gammas[on_replay] for policy, gammas in policy_gammas.items()}
    tables = {
        "prompt_alignment": alignment,
        "fixed_gamma_observed": fixed_gamma_observed(steps, protocol, seed),
        "scoring_paper_vs_observed": scoring_comparison(protocol, seed),
        "signals_by_gamma": signals_by_gamma(steps),
        "signal_correlations": signal_correlations(steps),
        "leakage_accuracy": leakage_accuracy(steps, folds),
        "train_test_hygiene": hygiene_table(protocol, steps, folds, seed),
        "cost_model": cost,
        "gamma_speed": speed,
        "best_gamma": best_gamma_table(speed, data.optimal_gamma),
        "replay_consistency": logged_replay_consistency(steps),
        "policy_replay": replayed_policy_outcomes(replay, replay_gammas, cost, ["compression"], seed),
        "policy_vs_fastest_fixed": replayed_speed_vs_baseline(
            replay, replay_gammas, FASTEST_FIXED, cost, seed
        ),
    }
    tables["replay_bias"] = replay_bias_table(speed, tables["best_gamma"], tables["policy_replay"])
    tables["conclusions"] = conclusions(tables)
    out_dir = Path(out_dir)
    scatter = {
        name: out_of_fold(folds[(name, "MLP-16")], steps, lambda model, rows: model.predict(rows))
        for name in (SAME_STEP, PREVIOUS_STEP)
    }
    report_path = write_audit_report(out_dir, steps, tables, scatter, seed)
    return CommandResult(report_path, audit_summary(tables, report_path), tables)


def audit_policy_gammas(
    steps: pd.DataFrame, folds: dict, cost: pd.DataFrame, optimal_gamma: pd.DataFrame
) -> dict[str, np.ndarray]:
    """γ per logged step for every policy of the audit; learned ones use out-of-fold models."""
    seconds = np.column_stack([step_seconds(steps, np.full(len(steps), gamma), cost) for gamma in GAMMAS])
    same_step = out_of_fold(folds[(SAME_STEP, "MLP-16")], steps, candidate_scores)
    previous = out_of_fold(folds[(PREVIOUS_STEP, "MLP-16")], steps, candidate_scores)
    return {
        **{f"Fixed-{gamma}": np.full(len(steps), gamma) for gamma in GAMMAS},
        "Fixed-best (tokens/step)": steps["compression"].map(fixed_best_gamma(steps)).to_numpy(dtype=int),
        "Task-oracle": task_oracle_gamma(steps, optimal_gamma),
        FASTEST_FIXED: fastest_fixed_gamma_out_of_fold(steps, cost),
        "SpecKV (same-step signals)": best_gamma(same_step),
        "SpecKV (previous-step signals)": best_gamma(previous),
        "SpecKV-cost (same-step signals)": best_gamma(same_step / seconds),
        "SpecKV-cost (previous-step signals)": best_gamma(previous / seconds),
    }


def write_audit_report(
    out_dir: Path,
    steps: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    scatter: dict[str, np.ndarray],
    seed: int,
) -> Path:
    """report.md: conclusions first, then one section per audited point with its tables."""
    doc = report.MarkdownReport(out_dir, "SpecKV paper: audit of the offline evaluation")
    doc.text(
        f"""
Produced by `speckv paper audit --seed {seed}`. The same released data as `speckv paper reproduce`, evaluated
honestly. Greedy decoding makes every step replayable: the draft proposes the same tokens whatever
γ is and the target accepts the same prefix, so a step logged at γ = {max(GAMMAS)} with `accepted` = k
would have produced exactly min(k, γ′) + 1 tokens at any γ′ ≤ {max(GAMMAS)}. Policies are scored by
replaying them on the {len(replay_rows(steps)):,} steps logged at γ = {max(GAMMAS)}, where every choice is
identified, so all policies are scored on the same steps. (Scoring only the rows that happened to
run at a policy's chosen γ would select rows by the policy's own choice.) CIs resample whole prompts ({steps["prompt"].nunique()} prompts; {CI_RESAMPLES:,} resamples)
unless a table says otherwise.
"""
    )
    doc.text("## Conclusions")
    doc.table("conclusions", tables["conclusions"])
    _alignment_section(doc, tables)
    _replay_section(doc, tables)
    _scoring_section(doc, tables)
    _leakage_section(doc, steps, tables, scatter)
    _hygiene_section(doc, tables)
    _cost_section(doc, tables)
    return doc.write()


def _alignment_section(doc: report.MarkdownReport, tables) -> None:
    checks = tables["prompt_alignment"]
    complete = single_row(checks, check="run matches only its own row in its block, all quantities")
    doc.text(
        f"""
## Recovering the prompt of each step
`{STEP_FILE}` has no prompt column. Runs are contiguous blocks whose `step` restarts at 0; the
k-th block is taken to be the k-th row of `{RUN_FILE}`, and the checks below test that. In
{complete["runs_passing"]} of {complete["runs"]} runs the step block agrees with its own run and with no
other run of the same (compression, γ, task), so the recorded order is the only consistent one.
"""
    )
    doc.table("prompt_alignment", checks, digits=6)


def _replay_section(doc: report.MarkdownReport, tables) -> None:
    doc.text(
        """
## Replay: is a step's outcome at another γ identified?
The replay assumes the target accepts the same draft tokens whatever γ is. Each run reveals, per
text position, whether the draft's greedy token matched the target's; runs of one prompt at
different γ must then agree wherever they overlap. Conflicts mean the target's choice depended on
the verification width (numerics), so replayed outcomes there are approximate.
"""
    )
    doc.table("replay_consistency", tables["replay_consistency"])


def _scoring_section(doc: report.MarkdownReport, tables) -> None:
    observed = tables["fixed_gamma_observed"]
    doc.text(
        f"""
## Scoring: the paper's score vs observed outcomes
What Fixed-γ actually produces per step (the runs at γ, all prompts), the same replayed from the
γ = {max(GAMMAS)} runs (a check of the replay: it should be close), and the paper's score for
Fixed-γ (refit MLP-16 on its test rows).
"""
    )
    shown = observed.assign(
        observed=[ci_text(*v) for v in observed[["observed_tokens_per_step", "ci_low", "ci_high"]].to_numpy()]
    )[
        [
            "compression",
            "gamma",
            "steps_run_at_gamma",
            "observed",
            f"replayed_from_gamma_{max(GAMMAS)}",
            "paper_score",
        ]
    ]
    doc.table("fixed_gamma_observed", observed, shown)
    scoring = tables["scoring_paper_vs_observed"]
    doc.text(
        """
The paper's own setup (its test rows, the refit MLP-16's decisions), scored by the paper's
formula and by replay on the test steps logged at γ = 8.
"""
    )
    shown = scoring.assign(
        observed=[ci_text(*v) for v in scoring[["tokens_per_step", "ci_low", "ci_high"]].to_numpy()]
    )[
        [
            "compression",
            "policy",
            "mean_gamma",
            "paper_score_all_test_rows",
            "paper_score_replay_rows",
            "observed",
        ]
    ]
    doc.table("scoring_paper_vs_observed", scoring, shown)
    pooled = scoring[scoring["compression"] == "all"]
    paper_bars = pooled.assign(measure="paper's score", value=pooled["paper_score_replay_rows"])
    paper_bars = paper_bars.assign(low=paper_bars["value"], high=paper_bars["value"])
    observed_bars = pooled.assign(
        measure="observed (replay)",
        value=pooled["tokens_per_step"],
        low=pooled["ci_low"],
        high=pooled["ci_high"],
    )
    bars = pd.concat([paper_bars, observed_bars])
    doc.figure(
        report.grouped_bars(
            bars,
            "policy",
            "measure",
            "value",
            doc.figure_path("paper_score_vs_observed"),
            "Tokens per step: paper's score vs replayed outcome (test steps logged at γ=8)",
            "tokens / step",
            "low",
            "high",
        ),
        "The paper's score against what the same γ choices produce on the same steps (95% CI by prompt).",
    )


def _leakage_section(
    doc: report.MarkdownReport, steps: pd.DataFrame, tables, scatter: dict[str, np.ndarray]
) -> None:
    doc.text(
        """
## Leakage: signals that exist only after drafting
The paper's features summarise the γ tokens drafted *in the step being predicted*, so they are
not known when γ is chosen, and they move with γ itself (a minimum over more tokens is lower):
"""
    )
    doc.table("signals_by_gamma", tables["signals_by_gamma"])
    doc.text(
        """
Features available before drafting are the previous step's signals (its entropy/confidence
summaries and acceptance rate; zeros and `first_step` = 1 at a run's first step). Correlation
with the step's acceptance rate, same-step vs previous-step signal:
"""
    )
    doc.table("signal_correlations", tables["signal_correlations"])
    doc.text(
        "Accuracy of the acceptance predictors per feature set, out of fold with a split by prompt "
        "(each of 5 folds holds out one prompt per task, all its runs; no refit):"
    )
    doc.table("leakage_accuracy", tables["leakage_accuracy"])
    actual = steps["acceptance_rate"].to_numpy()
    for name, predicted in scatter.items():
        slug = "same_step" if name.startswith("same") else "previous_step"
        doc.figure(
            report.scatter_predicted_actual(
                predicted,
                actual,
                doc.figure_path(f"predicted_vs_actual_{slug}"),
                f"MLP-16, {name}, out of fold",
                steps["compression"],
                "acceptance rate",
            ),
            f"Predicted vs actual acceptance, MLP-16 with {name} (split by prompt).",
        )


def _hygiene_section(doc: report.MarkdownReport, tables) -> None:
    doc.text(
        """
## Train/test hygiene
Test-set accuracy and SpecKV's gain over Fixed-4 on the paper's own score, under the paper's
regime (row split, refit on all rows), a row split without the refit, and a split by prompt
without refit (5 folds; bootstrap over steps and over prompts). p is one-sided
(10,000 resamples).
"""
    )
    hygiene = tables["train_test_hygiene"]
    shown = hygiene.assign(
        gain=[ci_text(*v) for v in hygiene[["speckv_minus_fixed4", "ci_low", "ci_high"]].to_numpy()],
        p=hygiene["p_one_sided"].map(format_p),
    )[["setup", "predictor", "bootstrap_unit", "test_steps", "test_r2", "test_mae", "gain", "p"]]
    doc.table("train_test_hygiene", hygiene, shown.rename(columns={"gain": "SpecKV − Fixed-4 [95% CI]"}))


def _cost_section(doc: report.MarkdownReport, tables) -> None:
    doc.text(
        """
## Cost: tokens per second
`phase2_experiment_results.csv` holds the only wall-clock data. Per compression, least squares
fit of elapsed = steps·t_verify + steps·γ·t_draft over its runs (80 runs each). The paper ran
without a KV cache, so these are mean costs per forward pass over sequences of prompt + up to 80
tokens; they do not transfer to a cached engine.
"""
    )
    doc.table("cost_model", tables["cost_model"])
    speed = tables["gamma_speed"]
    doc.text("Per compression and γ: observed tokens/step of the runs at γ, modelled and measured tokens/s.")
    doc.table("gamma_speed", speed)
    doc.table("best_gamma", tables["best_gamma"])
    for column, name, label in (
        ("tokens_per_step", "tokens_per_step_vs_gamma", "tokens / step"),
        ("measured_tokens_per_s", "tokens_per_second_vs_gamma", "measured tokens / s"),
    ):
        doc.figure(
            report.line_chart(
                speed, "gamma", column, "compression", doc.figure_path(name), f"{label} vs γ", label
            ),
            f"{label} against γ per compression.",
        )
    replayed = tables["policy_replay"]
    doc.text(
        f"""
Every policy replayed on the steps logged at γ = 8 (learned policies out of fold, by prompt;
"{FASTEST_FIXED}" picks per compression the fixed γ with the highest modelled tokens/s on the other
prompts; Task-oracle is the paper's, chosen on all prompts). SpecKV maximises the paper's
tokens/step objective; SpecKV-cost maximises predicted tokens / modelled step time.
"""
    )
    replayed_ci = replayed.assign(
        mean=replayed["tokens_per_s"], ci_low=replayed["tps_ci_low"], ci_high=replayed["tps_ci_high"]
    )
    shown = pivot_with_ci(replayed_ci, ["policy"], "compression", digits=1).rename(
        columns=lambda c: c if c == "policy" else f"{c} tok/s"
    )
    steps_shown = pivot_with_ci(replayed, ["policy"], "compression", "tokens_per_step", digits=2).rename(
        columns=lambda c: c if c == "policy" else f"{c} tok/step"
    )
    doc.table("policy_replay", replayed, shown.merge(steps_shown), digits=2)
    figure_policies = [
        "Fixed-2",
        "Fixed-4",
        "Fixed-8",
        FASTEST_FIXED,
        "Task-oracle",
        "SpecKV (same-step signals)",
        "SpecKV (previous-step signals)",
        "SpecKV-cost (previous-step signals)",
    ]
    doc.figure(
        report.grouped_bars(
            replayed_ci[replayed_ci["policy"].isin(figure_policies)],
            "compression",
            "policy",
            "mean",
            doc.figure_path("policy_tokens_per_second"),
            "Modelled tokens/s by policy (replay of the γ=8 steps), 95% CI",
            "tokens / s",
            "ci_low",
            "ci_high",
        ),
        "Policies in tokens per second, per compression.",
    )
    doc.text(
        "The replay starts every step where the γ = 8 runs did: harder positions than a smaller γ meets on "
        "its own, so small-γ policies replay below their on-policy rate. For the fastest fixed γ:"
    )
    doc.table("replay_bias", tables["replay_bias"])
    comparison = tables["policy_vs_fastest_fixed"]
    doc.text(
        f"Paired differences in modelled tokens/s against {FASTEST_FIXED} (by prompt, one-sided p for 'faster'):"
    )
    shown = comparison.assign(
        difference=[
            ci_text(*v, 2) for v in comparison[["tokens_per_s_difference", "ci_low", "ci_high"]].to_numpy()
        ],
        p=comparison["p_one_sided"].map(format_p),
    )[["compression", "policy", "difference", "p"]]
    doc.table("policy_vs_fastest_fixed", comparison, shown)


def audit_summary(tables: dict[str, pd.DataFrame], report_path: Path) -> str:
    """A compact terminal summary: each claim's verdict."""
    lines = ["SpecKV paper audit (observed outcomes, pre-draft signals, prompt split, cost model)"]
    for row in tables["conclusions"].itertuples():
        lines.append(f"- {row.claim}: {row.verdict}")
    lines.append(f"report: {report_path}")
    return "\n".join(lines)
