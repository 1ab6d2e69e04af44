"""The paper's score ("expected tokens per step") set against what the same γ choices produce.

Fixed-γ is checked against the runs at γ, and the paper's own decisions on its test rows
against their replayed outcome.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from speckv.paper.data import GAMMAS
from speckv.paper.protocol import ProtocolRun, paper_expected_tokens
from speckv.paper.replay import replay_rows, replayed_policy_outcomes, replayed_tokens, require_identified
from speckv.paper.results import CI_RESAMPLES, CONFIDENCE, labelled_groups
from speckv.util import stats


def fixed_gamma_observed(steps: pd.DataFrame, protocol: ProtocolRun, seed: int) -> pd.DataFrame:
    """Per compression and γ: what the runs at γ produced per step, the same replayed from the
    γ = 8 runs (a check of the replay), and the paper's score of Fixed-γ on its test rows.
    """
    scorer = protocol.refit["MLP-16"]
    records = []
    for by in ([], ["compression"]):
        # Both groupings label their groups by compression ("all" when pooled).
        test_rows_of = {
            labels["compression"]: part for labels, part in labelled_groups(protocol.test_rows, by)
        }
        for labels, part in labelled_groups(steps, by):
            logged_at_max = replay_rows(part)
            for gamma in GAMMAS:
                run_at_gamma = part[part["gamma"] == gamma]
                observed = stats.bootstrap_mean_ci(
                    run_at_gamma["tokens_produced"],
                    CI_RESAMPLES,
                    seed,
                    CONFIDENCE,
                    run_at_gamma["prompt"].to_numpy(),
                )
                replayed = replayed_tokens(logged_at_max["accepted"], logged_at_max["gamma"], gamma)
                records.append(
                    {
                        **labels,
                        "gamma": gamma,
                        "steps_run_at_gamma": len(run_at_gamma),
                        "observed_tokens_per_step": observed.estimate,
                        "ci_low": observed.low,
                        "ci_high": observed.high,
                        "observed_acceptance_rate": run_at_gamma["acceptance_rate"].mean(),
                        f"replayed_from_gamma_{max(GAMMAS)}": np.mean(require_identified(replayed)),
                        "paper_score": paper_expected_tokens(
                            scorer, test_rows_of[labels["compression"]], gamma
                        ).mean(),
                    }
                )
    return pd.DataFrame(records)


def scoring_comparison(protocol: ProtocolRun, seed: int) -> pd.DataFrame:
    """The paper's own setup (refit MLP-16 decisions on its test rows) scored two ways.

    Replay needs every policy's outcome identified, so it uses the test rows logged at γ = 8;
    the paper's score is shown on all test rows (as published) and on those same rows.
    """
    scorer = protocol.refit["MLP-16"]
    rows = protocol.test_rows
    policy_gammas = {f"Fixed-{gamma}": np.full(len(rows), gamma) for gamma in GAMMAS}
    policy_gammas |= {name: g for name, g in protocol.policy_gammas["MLP-16"].items() if name != "Fixed-4"}
    paper_scores = rows[["compression", "gamma"]].assign(
        **{policy: paper_expected_tokens(scorer, rows, gammas) for policy, gammas in policy_gammas.items()}
    )
    on_replay_rows = (rows["gamma"] == max(GAMMAS)).to_numpy()
    replay_gammas = {policy: gammas[on_replay_rows] for policy, gammas in policy_gammas.items()}
    tables = []
    for by in ([], ["compression"]):
        replayed = replayed_policy_outcomes(rows[on_replay_rows], replay_gammas, None, by, seed)
        published = _policy_means(paper_scores, list(policy_gammas), by, "paper_score_all_test_rows")
        same_rows = _policy_means(
            paper_scores[on_replay_rows], list(policy_gammas), by, "paper_score_replay_rows"
        )
        tables.append(replayed.merge(published).merge(same_rows))
    return pd.concat(tables, ignore_index=True)


def _policy_means(scores: pd.DataFrame, policies: list[str], by: list[str], name: str) -> pd.DataFrame:
    """Long table (group labels, policy, `name`) of per-group means of each policy column."""
    return pd.DataFrame(
        [
            {**labels, "policy": policy, name: part[policy].mean()}
            for labels, part in labelled_groups(scores, by)
            for policy in policies
        ]
    )
