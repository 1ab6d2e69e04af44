"""Reproduce and audit the SpecKV paper's offline evaluation from its released CSVs.

`reproduce` follows the protocol of the paper's released notebooks exactly, flaws included
(see the data's README): a step-level random split, predictors refit on every row before the
policy evaluation, and every policy scored by the predictor's own prediction.

`audit` evaluates the same data honestly: policies scored with observed outcomes, predictors
restricted to signals that exist before γ is chosen, a split by prompt, and a wall-clock cost
model, because tokens per step ignores what the drafted tokens cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

from speckv.controllers.predictor import AcceptancePredictor
from speckv.errors import SpecKVError
from speckv.util import reporting as report
from speckv.util import stats

STEP_FILE = "phase2_step_results.csv"
RUN_FILE = "phase2_experiment_results.csv"
ORACLE_FILE = "phase2_optimal_gamma.csv"
STEP_SIGNALS = ["mean_draft_entropy", "mean_draft_confidence", "max_draft_entropy", "min_draft_confidence"]
REQUIRED_COLUMNS = {
    STEP_FILE: [
        "compression",
        "gamma",
        "task",
        "step",
        "accepted",
        "acceptance_rate",
        "tokens_produced",
        *STEP_SIGNALS,
    ],
    RUN_FILE: [
        "compression",
        "gamma",
        "task",
        "prompt",
        "num_tokens",
        "elapsed_sec",
        "tokens_per_sec",
        "mean_acceptance_rate",
        "mean_draft_entropy",
        "mean_draft_confidence",
        "num_steps",
    ],
    ORACLE_FILE: ["compression", "task", "optimal_gamma", "best_tps"],
}
TEXT_COLUMNS = {"compression", "task", "prompt"}

GAMMAS = (2, 4, 6, 8)
COMPRESSION_CODE = {"fp16": 0, "int8": 1, "nf4": 2}
PAPER_FEATURES = [*STEP_SIGNALS, "comp_enc", "gamma"]
# The paper's split and models use random_state=42; --seed only drives the bootstraps.
PROTOCOL_RANDOM_STATE = 42
PAPER_PREDICTORS = {"MLP-16": "mlp16", "RF-100": "rf100"}
CI_RESAMPLES = 5000
PVALUE_RESAMPLES = 10000
CONFIDENCE = 0.95
# The run summaries round means to 4 decimals, so step means agree to about 5e-5.
ROUNDING_TOLERANCE = 5e-4

# The audit's feature sets: the paper's (signals of the step being predicted), signals known
# before drafting (the previous step's), and a floor without any signal.
PREVIOUS_SIGNALS = [f"prev_{name}" for name in [*STEP_SIGNALS, "acceptance_rate"]]
PRE_DRAFT_FEATURES = [*PREVIOUS_SIGNALS, "first_step", "comp_enc", "gamma"]
SAME_STEP = "same-step signals (paper)"
PREVIOUS_STEP = "previous-step signals"
FEATURE_SETS = {
    SAME_STEP: PAPER_FEATURES,
    PREVIOUS_STEP: PRE_DRAFT_FEATURES,
    "γ and compression only": ["comp_enc", "gamma"],
}
# Train/test regimes compared by the audit.
PAPER_REGIME = "row split, refit on all rows (paper)"
ROW_SPLIT = "row split, training rows only"
PROMPT_SPLIT = "prompt split (5 folds), no refit"
FASTEST_FIXED = "Fixed-best (tokens/s)"


# --------------------------------------------------------------------------------------------
# Loading and validation


@dataclass(frozen=True)
class PaperData:
    """The three released tables; `steps` gains `comp_enc` (fp16=0, int8=1, nf4=2)."""

    steps: pd.DataFrame
    runs: pd.DataFrame
    optimal_gamma: pd.DataFrame


def load_paper_data(data_dir: str | Path) -> PaperData:
    """Read and validate the released CSVs; any problem is one SpecKVError line."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpecKVError(f"paper data directory not found: {data_dir}")
    steps, runs, optimal_gamma = (_read_table(data_dir / name) for name in REQUIRED_COLUMNS)
    steps = steps.assign(comp_enc=steps["compression"].map(COMPRESSION_CODE))
    return PaperData(steps=steps, runs=runs, optimal_gamma=optimal_gamma)


def _read_table(path: Path) -> pd.DataFrame:
    """One CSV with its required columns present, numeric where expected, and known labels."""
    if not path.is_file():
        raise SpecKVError(f"missing {path.name} in {path.parent}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise SpecKVError(f"cannot parse {path}: {str(error).splitlines()[0]}") from error
    columns = REQUIRED_COLUMNS[path.name]
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise SpecKVError(f"{path} is malformed: missing columns {', '.join(missing)}")
    if frame.empty:
        raise SpecKVError(f"{path} is malformed: no rows")
    for name in columns:
        if name in TEXT_COLUMNS and frame[name].isna().any():
            raise SpecKVError(f"{path} is malformed: column {name!r} has missing values")
        if name not in TEXT_COLUMNS:
            frame[name] = _numeric_column(frame[name], path, name)
    _check_labels(frame, path)
    return frame


def _numeric_column(column: pd.Series, path: Path, name: str) -> pd.Series:
    """The column as numbers; blanks or text are a malformed file."""
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.isna().any():
        raise SpecKVError(f"{path} is malformed: column {name!r} has missing or non-numeric values")
    return numbers


def _check_labels(frame: pd.DataFrame, path: Path) -> None:
    """Compression levels and γ must be the ones the protocol knows."""
    unknown = set(frame["compression"]) - set(COMPRESSION_CODE)
    if unknown:
        raise SpecKVError(f"{path} has unknown compression levels: {sorted(map(str, unknown))}")
    gamma_column = "gamma" if "gamma" in frame.columns else "optimal_gamma"
    bad_gammas = set(frame[gamma_column]) - set(GAMMAS)
    if bad_gammas:
        raise SpecKVError(f"{path} has γ values outside {GAMMAS}: {sorted(bad_gammas)}")


# --------------------------------------------------------------------------------------------
# The paper's protocol


def paper_split(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The released 80/20 row split, stratified by compression and task (indices sorted)."""
    strata = steps["compression"] + "_" + steps["task"]
    train, test = train_test_split(
        np.arange(len(steps)), test_size=0.2, random_state=PROTOCOL_RANDOM_STATE, stratify=strata
    )
    return np.sort(train), np.sort(test)


def fit_predictor(kind: str, features: list[str], rows: pd.DataFrame) -> AcceptancePredictor:
    """A predictor of `kind` fitted to the rows' acceptance rates."""
    return AcceptancePredictor(kind, features).fit(rows, rows["acceptance_rate"])


def paper_expected_tokens(predictor: AcceptancePredictor, rows: pd.DataFrame, gammas) -> np.ndarray:
    """The paper's step score: clip(predicted acceptance with γ substituted, 0, 1)·γ + 1.

    The row's draft signals are kept as they are, whatever γ is substituted.
    """
    gammas = np.broadcast_to(np.asarray(gammas, dtype=float), (len(rows),))
    return predictor.predict(rows.assign(gamma=gammas), clip=True) * gammas + 1.0


def candidate_scores(predictor: AcceptancePredictor, rows: pd.DataFrame) -> np.ndarray:
    """The paper's score of every candidate γ, rows × len(GAMMAS)."""
    return np.column_stack([paper_expected_tokens(predictor, rows, gamma) for gamma in GAMMAS])


def best_gamma(scores: np.ndarray) -> np.ndarray:
    """The γ with the highest score per row (ties go to the smaller γ)."""
    return np.asarray(GAMMAS)[np.argmax(scores, axis=1)]


def fixed_best_gamma(steps: pd.DataFrame) -> dict[str, int]:
    """Per compression, the γ with the highest mean tokens_produced over all rows."""
    means = steps.groupby(["compression", "gamma"])["tokens_produced"].mean()
    return {compression: int(part.idxmax()[1]) for compression, part in means.groupby(level=0)}


def task_oracle_gamma(rows: pd.DataFrame, optimal_gamma: pd.DataFrame) -> np.ndarray:
    """The released per-(compression, task) γ with the highest measured tokens per second."""
    lookup = optimal_gamma.set_index(["compression", "task"])["optimal_gamma"]
    keys = pd.MultiIndex.from_frame(rows[["compression", "task"]])
    gammas = lookup.reindex(keys)
    if gammas.isna().any():
        missing = sorted(set(keys[gammas.isna().to_numpy()]))
        raise SpecKVError(f"{ORACLE_FILE} has no optimal γ for {missing[:3]}")
    return gammas.to_numpy(dtype=int)


def paper_policy_gammas(
    predictor: AcceptancePredictor, steps: pd.DataFrame, rows: pd.DataFrame, optimal_gamma: pd.DataFrame
) -> dict[str, np.ndarray]:
    """γ chosen on each row by the paper's four policies."""
    return {
        "Fixed-4": np.full(len(rows), 4),
        "Fixed-best": rows["compression"].map(fixed_best_gamma(steps)).to_numpy(dtype=int),
        "Task-oracle": task_oracle_gamma(rows, optimal_gamma),
        "SpecKV": best_gamma(candidate_scores(predictor, rows)),
    }


def prediction_metrics(predictor: AcceptancePredictor, rows: pd.DataFrame) -> dict[str, float]:
    """R², MAE and RMSE of predicted vs actual acceptance rate on `rows`."""
    predicted = predictor.predict(rows)
    actual = rows["acceptance_rate"].to_numpy()
    return {
        "r2": r2_score(actual, predicted),
        "mae": mean_absolute_error(actual, predicted),
        "rmse": float(np.sqrt(mean_squared_error(actual, predicted))),
    }


@dataclass
class ProtocolRun:
    """Everything the paper's protocol computes before summarising."""

    train: np.ndarray
    test: np.ndarray
    held_out: dict[str, AcceptancePredictor]  # fitted on the training rows only
    refit: dict[str, AcceptancePredictor]  # refit on all rows, as the paper does
    test_rows: pd.DataFrame
    policy_gammas: dict[str, dict[str, np.ndarray]]  # predictor → policy → γ per test row
    scores: dict[str, pd.DataFrame]  # predictor → test rows with one score column per policy


def run_protocol(data: PaperData) -> ProtocolRun:
    """Split, fit, refit on all rows, choose γ per policy and score every test row."""
    steps = data.steps
    train, test = paper_split(steps)
    held_out = {
        name: fit_predictor(kind, PAPER_FEATURES, steps.iloc[train])
        for name, kind in PAPER_PREDICTORS.items()
    }
    refit = {name: fit_predictor(kind, PAPER_FEATURES, steps) for name, kind in PAPER_PREDICTORS.items()}
    test_rows = steps.iloc[test].reset_index(drop=True)
    policy_gammas, scores = {}, {}
    for name, predictor in refit.items():
        policy_gammas[name] = paper_policy_gammas(predictor, steps, test_rows, data.optimal_gamma)
        scored = test_rows[["compression", "task", "gamma"]].copy()
        for policy, gammas in policy_gammas[name].items():
            scored[policy] = paper_expected_tokens(predictor, test_rows, gammas)
        scores[name] = scored
    return ProtocolRun(train, test, held_out, refit, test_rows, policy_gammas, scores)


# --------------------------------------------------------------------------------------------
# Summaries: bootstrap CIs and paired tests per group


def _groups(frame: pd.DataFrame, by: list[str]):
    """(labels, part) for each group of `by`, or one group labelled compression=all."""
    if not by:
        yield {"compression": "all"}, frame
        return
    for key, part in frame.groupby(by, sort=False):
        yield dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), part


def summarise_policies(scored: pd.DataFrame, policies: list[str], by: list[str], seed: int) -> pd.DataFrame:
    """Mean of each policy's per-row value with a row-bootstrap CI (the paper's), per group of `by`."""
    records = []
    for labels, part in _groups(scored, by):
        for policy in policies:
            ci = stats.bootstrap_mean_ci(part[policy], CI_RESAMPLES, seed, CONFIDENCE)
            records.append(
                {
                    **labels,
                    "policy": policy,
                    "mean": ci.estimate,
                    "ci_low": ci.low,
                    "ci_high": ci.high,
                    "n_steps": len(part),
                }
            )
    return pd.DataFrame(records)


def paired_comparison(
    scored: pd.DataFrame, treatment: str, baseline: str, by: list[str], seed: int
) -> pd.DataFrame:
    """Mean paired difference treatment − baseline with a row-bootstrap CI and one-sided p, per group."""
    records = []
    for labels, part in _groups(scored, by):
        difference = part[treatment].to_numpy() - part[baseline].to_numpy()
        ci = stats.bootstrap_mean_ci(difference, CI_RESAMPLES, seed, CONFIDENCE)
        p_value = stats.paired_bootstrap_pvalue(part[treatment], part[baseline], PVALUE_RESAMPLES, seed)
        records.append(
            {
                **labels,
                treatment: part[treatment].mean(),
                baseline: part[baseline].mean(),
                "difference": ci.estimate,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "p_one_sided": p_value,
                "n_steps": len(part),
            }
        )
    return pd.DataFrame(records)


def ci_text(mean: float, low: float, high: float, digits: int = 3) -> str:
    """'mean [low, high]' for Markdown tables."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pivot_with_ci(
    summary: pd.DataFrame, index: list[str], columns: str = "policy", value: str = "mean", digits: int = 3
) -> pd.DataFrame:
    """One row per `index` group, one 'value [ci_low, ci_high]' column per `columns` value, in order."""
    cells = [ci_text(*v, digits) for v in summary[[value, "ci_low", "ci_high"]].to_numpy()]
    wide = summary.assign(cell=cells).pivot(index=index, columns=columns, values="cell")
    order = (
        pd.MultiIndex.from_frame(summary[index].drop_duplicates())
        if len(index) > 1
        else summary[index[0]].unique()
    )
    return wide.reindex(index=order, columns=summary[columns].unique()).reset_index()


def format_p(p_value: float, resamples: int = PVALUE_RESAMPLES) -> str:
    """A bootstrap p-value; 0 is shown as below the resolution 1/resamples."""
    return f"< {1 / resamples:.0e}" if p_value == 0 else f"{p_value:.4f}"


# --------------------------------------------------------------------------------------------
# Decision overhead of SpecKV's γ choice


def decision_overhead(predictor: AcceptancePredictor, rows: pd.DataFrame, decisions: int) -> pd.DataFrame:
    """Per-decision wall time of SpecKV's choice (score 4 candidate γ, argmax): sklearn vs numpy.

    Also checks that both paths choose the same γ on every row given.
    """
    gamma_column = PAPER_FEATURES.index("gamma")
    gammas = np.asarray(GAMMAS, dtype=float)
    vectors = rows[PAPER_FEATURES].to_numpy(dtype=float)

    def candidates(vector: np.ndarray) -> np.ndarray:
        matrix = np.repeat(vector[None, :], len(gammas), axis=0)
        matrix[:, gamma_column] = gammas
        return matrix

    def choose_sklearn(vector: np.ndarray) -> float:
        return gammas[np.argmax(predictor.predict(candidates(vector), clip=True) * gammas)]

    def choose_numpy(vector: np.ndarray) -> float:
        return gammas[np.argmax(np.clip(predictor.predict_fast(candidates(vector)), 0.0, 1.0) * gammas)]

    agreement = np.mean([choose_sklearn(v) == choose_numpy(v) for v in vectors])
    records = []
    for path, choose, count in (
        ("sklearn predict", choose_sklearn, decisions),
        ("numpy predict_fast", choose_numpy, 10 * decisions),
    ):
        timings = _time_each_call(choose, vectors, count)
        records.append(
            {
                "path": path,
                "decisions_timed": count,
                "median_us": float(np.median(timings)) / 1e3,
                "p90_us": float(np.percentile(timings, 90)) / 1e3,
                "median_ms": float(np.median(timings)) / 1e6,
                "same_gamma_share": agreement,
            }
        )
    return pd.DataFrame(records)


def _time_each_call(function, vectors: np.ndarray, count: int) -> np.ndarray:
    """Nanoseconds of each of `count` calls, cycling through the given feature vectors."""
    timings = np.empty(count)
    for call in range(count):
        vector = vectors[call % len(vectors)]
        start = time.perf_counter_ns()
        function(vector)
        timings[call] = time.perf_counter_ns() - start
    return timings


@dataclass(frozen=True)
class CommandResult:
    """What a `speckv paper` command produced."""

    report_path: Path
    summary: str
    tables: dict[str, pd.DataFrame]


def run_command(action: str, data_dir: str | Path, out_dir: str | Path, seed: int) -> int:
    """Entry point of `speckv paper reproduce|audit`: run, print the summary, return 0."""
    command = {"reproduce": reproduce, "audit": audit}[action]
    result = command(data_dir, out_dir, seed)
    print(result.summary)
    return 0


# --------------------------------------------------------------------------------------------
# speckv paper reproduce


def reproduce(data_dir: str | Path, out_dir: str | Path = "paper-reproduce", seed: int = 42) -> CommandResult:
    """Run the paper's released evaluation protocol and write tables, figures and report.md."""
    data = load_paper_data(data_dir)
    out_dir = Path(out_dir)
    run = run_protocol(data)
    scored = run.scores["MLP-16"]
    policies = list(run.policy_gammas["MLP-16"])
    speckv_gammas = run.policy_gammas["MLP-16"]["SpecKV"]
    tables = {
        "predictor_accuracy": protocol_predictor_accuracy(run),
        "policy_overall": summarise_policies(scored, policies, [], seed),
        "policy_by_compression": summarise_policies(scored, policies, ["compression"], seed),
        "policy_by_compression_task": summarise_policies(scored, policies, ["compression", "task"], seed),
        "speckv_vs_fixed4": pd.concat(
            [paired_comparison(scored, "SpecKV", "Fixed-4", by, seed) for by in ([], ["compression"])]
        ),
        "speckv_gamma_choice": gamma_shares(run.test_rows, speckv_gammas),
        "rf100_policy_by_compression": pd.concat(
            [summarise_policies(run.scores["RF-100"], policies, by, seed) for by in ([], ["compression"])]
        ),
        "decision_overhead": decision_overhead(run.refit["MLP-16"], run.test_rows, decisions=2000),
    }
    report_path = write_reproduce_report(out_dir, data, run, tables, seed)
    return CommandResult(report_path, reproduce_summary(tables, report_path), tables)


def protocol_predictor_accuracy(run: ProtocolRun) -> pd.DataFrame:
    """Test-split accuracy of each predictor, trained on the training split and after the refit."""
    records = []
    for name in PAPER_PREDICTORS:
        for trained_on, predictor in (
            ("training split (80%)", run.held_out[name]),
            ("all rows (the paper's refit)", run.refit[name]),
        ):
            metrics = prediction_metrics(predictor, run.test_rows)
            records.append(
                {"predictor": name, "trained on": trained_on, "evaluated on": "test split", **metrics}
            )
    return pd.DataFrame(records)


def gamma_shares(rows: pd.DataFrame, gammas: np.ndarray) -> pd.DataFrame:
    """Share of rows on which each γ was chosen, overall and per compression."""
    chosen = rows[["compression"]].assign(gamma=gammas)
    records = []
    for labels, part in [*_groups(chosen, []), *_groups(chosen, ["compression"])]:
        counts = part["gamma"].value_counts().reindex(GAMMAS, fill_value=0)
        for gamma, count in counts.items():
            records.append({**labels, "gamma": gamma, "share": count / len(part), "n_steps": int(count)})
    return pd.DataFrame(records)


def write_reproduce_report(
    out_dir: Path, data: PaperData, run: ProtocolRun, tables: dict[str, pd.DataFrame], seed: int
) -> Path:
    """report.md with every table and the figures a reader of the paper expects."""
    doc = report.MarkdownReport(out_dir, "SpecKV paper: reproduction of the offline evaluation")
    fixed_best = fixed_best_gamma(data.steps)
    doc.text(
        f"""
Produced by `speckv paper reproduce --seed {seed}`. This follows the protocol of the paper's released notebooks
exactly, **flaws included**; `speckv paper audit` re-evaluates the same data honestly.

- Data: {len(data.steps):,} speculation steps from {len(data.runs)} runs.
- Split: `train_test_split(test_size=0.2, random_state=42, stratify=compression_task)`:
  {len(run.train):,} training rows, {len(run.test):,} test rows.
- Features: {", ".join(f"`{name}`" for name in PAPER_FEATURES)}; target `acceptance_rate`.
- Predictors: MLP-16 and RF-100 fitted on the training rows, then refit on all rows (test rows
  included) before the policy evaluation, as the paper does.
- Policies on each test row: Fixed-4; Fixed-best (per compression, the γ with the highest mean
  `tokens_produced`: {", ".join(f"{c} γ={g}" for c, g in fixed_best.items())}); Task-oracle
  (γ from `{ORACLE_FILE}`); SpecKV (γ ∈ {{2, 4, 6, 8}} maximising the score below).
- Score of every policy ("expected tokens per step"): `clip(pred_acceptance(row features, γ), 0, 1)·γ + 1`
  with the refit MLP-16, the row's own draft signals kept whatever γ is substituted.
- 95% CIs: percentile bootstrap, {CI_RESAMPLES:,} resamples of the per-row values. SpecKV vs
  Fixed-4: one-sided paired bootstrap p-value ({PVALUE_RESAMPLES:,} resamples; the share of
  resampled mean differences ≤ 0).
"""
    )
    doc.text("## Predictor accuracy (acceptance rate)")
    doc.table("predictor_accuracy", tables["predictor_accuracy"])
    doc.text("## Expected tokens per step by policy")
    by_compression = pd.concat([tables["policy_overall"], tables["policy_by_compression"]])
    doc.table("policy_overall", tables["policy_overall"], pivot_with_ci(by_compression, ["compression"]))
    report.write_table(tables["policy_by_compression"], out_dir / "tables", "policy_by_compression")
    doc.figure(
        report.grouped_bars(
            by_compression,
            "compression",
            "policy",
            "mean",
            doc.figure_path("policy_by_compression"),
            "Expected tokens per step (paper's score), 95% CI",
            "expected tokens / step",
            "ci_low",
            "ci_high",
        ),
        "Policy comparison per compression (paper's protocol and score).",
    )
    doc.text("## SpecKV vs Fixed-4 (paired)")
    doc.table("speckv_vs_fixed4", tables["speckv_vs_fixed4"], _paired_display(tables["speckv_vs_fixed4"]))
    doc.text("## By compression and task")
    doc.table(
        "policy_by_compression_task",
        tables["policy_by_compression_task"],
        pivot_with_ci(tables["policy_by_compression_task"], ["compression", "task"]),
    )
    doc.text("## γ chosen by SpecKV")
    shares = tables["speckv_gamma_choice"]
    doc.table(
        "speckv_gamma_choice",
        shares,
        shares.pivot(index="compression", columns="gamma", values="share")
        .reindex(shares["compression"].unique())
        .rename(columns=lambda gamma: f"γ={gamma}")
        .reset_index(),
    )
    doc.figure(
        report.grouped_bars(
            shares.assign(gamma=shares["gamma"].map(lambda g: f"γ={g}")),
            "compression",
            "gamma",
            "share",
            doc.figure_path("speckv_gamma_choice"),
            "Share of test steps per γ chosen by SpecKV",
            "share of steps",
        ),
        "γ chosen by SpecKV per compression.",
    )
    doc.text("## Reference: RF-100 as SpecKV's predictor and scorer")
    rf100 = tables["rf100_policy_by_compression"]
    doc.table("rf100_policy_by_compression", rf100, pivot_with_ci(rf100, ["compression"]))
    doc.text("## Predicted vs actual acceptance")
    held_out = run.held_out["MLP-16"].predict(run.test_rows)
    doc.figure(
        report.scatter_predicted_actual(
            held_out,
            run.test_rows["acceptance_rate"].to_numpy(),
            doc.figure_path("predicted_vs_actual"),
            "MLP-16, trained on the training split, test rows",
            run.test_rows["compression"],
            "acceptance rate",
        ),
        "Predicted vs actual acceptance rate on the test rows (MLP-16 before the refit).",
    )
    doc.text(
        """
## Decision overhead (our implementation)
One SpecKV decision = build the 4 candidate feature rows, predict, pick the best γ. Timed per call
on this machine; the numpy path uses the MLP's weights exported by `AcceptancePredictor`.
"""
    )
    doc.table("decision_overhead", tables["decision_overhead"], digits=4)
    return doc.write()


def _paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """Paired-test table with the CI as text and p formatted at the bootstrap's resolution."""
    shown = paired.copy()
    shown["difference [95% CI]"] = [
        ci_text(m, lo, hi)
        for m, lo, hi in zip(shown["difference"], shown["ci_low"], shown["ci_high"], strict=True)
    ]
    shown["p (one-sided)"] = shown["p_one_sided"].map(format_p)
    return shown.drop(columns=["difference", "ci_low", "ci_high", "p_one_sided"])


def reproduce_summary(tables: dict[str, pd.DataFrame], report_path: Path) -> str:
    """A compact terminal summary of the reproduction."""
    by_compression = pd.concat([tables["policy_overall"], tables["policy_by_compression"]])
    means = by_compression.pivot(index="policy", columns="compression", values="mean")
    means = means.reindex(
        index=by_compression["policy"].unique(), columns=by_compression["compression"].unique()
    )
    accuracy = tables["predictor_accuracy"]
    held_out = accuracy[accuracy["trained on"].str.startswith("training")].set_index("predictor")["r2"]
    overall = tables["speckv_vs_fixed4"].iloc[0]
    overhead = tables["decision_overhead"].set_index("path")["median_us"]
    lines = [
        "SpecKV paper reproduction (released protocol; scored by the refit MLP-16's own prediction)",
        "test R² of acceptance (trained on 80%): " + ", ".join(f"{n} {v:.3f}" for n, v in held_out.items()),
        "expected tokens/step: " + "  ".join(f"{c:>6}" for c in means.columns),
        *[f"  {policy:<12}" + "  ".join(f"{v:6.3f}" for v in row) for policy, row in means.iterrows()],
        f"SpecKV − Fixed-4: {ci_text(overall['difference'], overall['ci_low'], overall['ci_high'])}, "
        f"one-sided p {format_p(overall['p_one_sided'])}",
        f"decision overhead (median): sklearn {overhead['sklearn predict']:.1f} µs, "
        f"numpy {overhead['numpy predict_fast']:.1f} µs",
        f"report: {report_path}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# speckv paper audit: recovering prompts


def recover_prompts(steps: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give each step row its run and prompt, and a table of how well the alignment checks out.

    Runs are contiguous blocks of step rows whose `step` restarts at 0, in the order of the run
    file. Prompts are numbered per task in order of first appearance (`code-1` … `code-5`).
    """
    run_ids = (steps["step"] == 0).cumsum().to_numpy() - 1
    if steps["step"].iloc[0] != 0 or run_ids[-1] + 1 != len(runs):
        raise SpecKVError(
            f"{STEP_FILE} has {run_ids[-1] + 1} runs (step restarting at 0) but {RUN_FILE} has "
            f"{len(runs)}; cannot recover prompts"
        )
    segments = run_segments(steps.assign(run=run_ids))
    checks = alignment_checks(segments, runs.reset_index(drop=True))
    prompt_index = runs.groupby("task", sort=False)["prompt"].transform(lambda texts: pd.factorize(texts)[0])
    prompt = runs["task"] + "-" + (prompt_index + 1).astype(str)
    recovered = steps.assign(
        run=run_ids, prompt_index=prompt_index.to_numpy()[run_ids], prompt=prompt.to_numpy()[run_ids]
    )
    return recovered, checks


def run_segments(steps: pd.DataFrame) -> pd.DataFrame:
    """Per-run aggregates of the step rows, named like the run file's columns."""
    runs = steps.groupby("run")
    return runs.agg(
        compression=("compression", "first"),
        gamma=("gamma", "first"),
        task=("task", "first"),
        num_steps=("step", "size"),
        num_tokens=("tokens_produced", "sum"),
        mean_acceptance_rate=("acceptance_rate", "mean"),
        mean_draft_entropy=("mean_draft_entropy", "mean"),
        mean_draft_confidence=("mean_draft_confidence", "mean"),
    ).assign(label_sets=runs[["compression", "gamma", "task"]].nunique().max(axis=1))


_EXACT = ["num_steps", "num_tokens"]
_ROUNDED = ["mean_acceptance_rate", "mean_draft_entropy", "mean_draft_confidence"]


def alignment_checks(segments: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """How many runs agree with their step segment on each recorded quantity."""
    labels = ["compression", "gamma", "task"]
    same_labels = (segments[labels].to_numpy() == runs[labels].to_numpy()).all(axis=1)
    records = [
        _check(
            "one compression, γ and task per block, equal to the run's",
            same_labels & (segments["label_sets"] == 1),
        ),
        _check(
            "num_steps = number of step rows",
            segments["num_steps"].to_numpy() == runs["num_steps"].to_numpy(),
        ),
        _check(
            "num_tokens = Σ tokens_produced",
            segments["num_tokens"].to_numpy() == runs["num_tokens"].to_numpy(),
        ),
    ]
    for column in _ROUNDED:
        difference = np.abs(segments[column].to_numpy() - runs[column].to_numpy())
        records.append(
            _check(
                f"{column} = mean over steps (±{ROUNDING_TOLERANCE:g})",
                difference <= ROUNDING_TOLERANCE,
                difference,
            )
        )
    records.append(
        _check(
            "run matches only its own row in its block, num_steps alone",
            _unique_matches(segments, runs, ["num_steps"], []),
        )
    )
    records.append(
        _check(
            "run matches only its own row in its block, all quantities",
            _unique_matches(segments, runs, _EXACT, _ROUNDED),
        )
    )
    return pd.DataFrame(records)


def _check(name: str, passed: np.ndarray, difference: np.ndarray | None = None) -> dict:
    return {
        "check": name,
        "runs_passing": int(np.sum(passed)),
        "runs": len(passed),
        "max_abs_difference": float(np.max(difference)) if difference is not None else np.nan,
    }


def _unique_matches(
    segments: pd.DataFrame, runs: pd.DataFrame, exact: list[str], rounded: list[str]
) -> np.ndarray:
    """Per run: does its segment agree with its own run and no other run of the same block?

    A block is the runs sharing (compression, γ, task); only the prompt order inside it is in
    question, so uniqueness there means the recorded order is the only consistent one.
    """
    unique = np.zeros(len(runs), dtype=bool)
    for positions in runs.groupby(["compression", "gamma", "task"], sort=False).indices.values():
        block_segments, block_runs = segments.iloc[positions], runs.iloc[positions]
        agrees = np.ones((len(positions), len(positions)), dtype=bool)
        for column in exact:
            agrees &= block_segments[column].to_numpy()[:, None] == block_runs[column].to_numpy()[None, :]
        for column in rounded:
            gap = np.abs(block_segments[column].to_numpy()[:, None] - block_runs[column].to_numpy()[None, :])
            agrees &= gap <= ROUNDING_TOLERANCE
        unique[positions] = np.diag(agrees) & (agrees.sum(axis=1) == 1)
    return unique


def add_previous_step_signals(steps: pd.DataFrame) -> pd.DataFrame:
    """Signals known before a step drafts: the previous step's, zero with `first_step`=1 at step 0."""
    previous = steps.groupby("run")[[*STEP_SIGNALS, "acceptance_rate"]].shift(1)
    first_step = previous.isna().any(axis=1).astype(float)
    columns = {f"prev_{name}": previous[name].fillna(0.0) for name in previous.columns}
    return steps.assign(**columns, first_step=first_step)


# --------------------------------------------------------------------------------------------
# speckv paper audit: cross-fitting by prompt, replay scoring, cost model


FoldModels = list[tuple[np.ndarray, AcceptancePredictor]]


def fit_prompt_folds(steps: pd.DataFrame, kind: str, features: list[str]) -> FoldModels:
    """One model per fold; fold k holds out the k-th prompt of every task (all its runs)."""
    folds = []
    for fold in np.unique(steps["prompt_index"]):
        held_out = (steps["prompt_index"] == fold).to_numpy()
        folds.append((held_out, fit_predictor(kind, features, steps[~held_out])))
    return folds


def out_of_fold(folds: FoldModels, steps: pd.DataFrame, apply) -> np.ndarray:
    """apply(model, rows) on each fold's held-out rows, assembled in row order."""
    result = None
    for held_out, model in folds:
        values = np.asarray(apply(model, steps[held_out]))
        if result is None:
            result = np.empty((len(steps), *values.shape[1:]))
        result[held_out] = values
    return result


def replayed_tokens(accepted, logged_gamma, chosen_gamma) -> np.ndarray:
    """Tokens a logged step would have produced had it drafted `chosen_gamma` tokens.

    Decoding is greedy, so the draft proposes the same tokens whatever γ is, and the target
    accepts the same prefix: with γ' ≤ γ, or a rejection before γ', the outcome is exactly
    min(accepted, γ') + 1. When all γ logged tokens were accepted and γ' > γ it is unknown: NaN.
    """
    accepted, logged_gamma, chosen_gamma = (np.asarray(a) for a in (accepted, logged_gamma, chosen_gamma))
    tokens = np.minimum(accepted, chosen_gamma) + 1.0
    unknown = (accepted == logged_gamma) & (chosen_gamma > logged_gamma)
    return np.where(unknown, np.nan, tokens)


def replay_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps logged at the largest γ: every policy's outcome is identified on them."""
    return steps[steps["gamma"] == max(GAMMAS)]


def fit_cost_model(runs: pd.DataFrame) -> pd.DataFrame:
    """Per compression, least squares of elapsed = steps·t_verify + steps·γ·t_draft.

    Without a KV cache every pass re-reads the whole sequence, so these are mean costs per pass
    over sequences of prompt + up to 80 tokens, not per-token costs of a cached engine.
    """
    records = []
    for compression, part in runs.groupby("compression", sort=False):
        design = np.column_stack([part["num_steps"], part["num_steps"] * part["gamma"]]).astype(float)
        elapsed = part["elapsed_sec"].to_numpy(dtype=float)
        (t_verify, t_draft), *_ = np.linalg.lstsq(design, elapsed, rcond=None)
        fitted = design @ np.array([t_verify, t_draft])
        modelled_rate = part["num_tokens"].to_numpy() / fitted
        records.append(
            {
                "compression": compression,
                "t_verify_ms": 1e3 * t_verify,
                "t_draft_ms": 1e3 * t_draft,
                "r2_elapsed": r2_score(elapsed, fitted),
                "tokens_per_s_mean_abs_pct_error": 100
                * np.mean(np.abs(modelled_rate / part["tokens_per_sec"] - 1)),
                "runs": len(part),
            }
        )
    return pd.DataFrame(records)


def step_seconds(rows: pd.DataFrame, gammas, cost: pd.DataFrame) -> np.ndarray:
    """Modelled wall time of each row's step at γ: t_verify + γ·t_draft of its compression."""
    by_compression = cost.set_index("compression")
    t_verify = rows["compression"].map(by_compression["t_verify_ms"]).to_numpy() / 1e3
    t_draft = rows["compression"].map(by_compression["t_draft_ms"]).to_numpy() / 1e3
    return t_verify + np.asarray(gammas, dtype=float) * t_draft


def gamma_speed_table(steps: pd.DataFrame, runs: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """Per compression and γ: observed tokens/step, modelled and measured tokens/s."""
    records = []
    for (compression, gamma), part in steps.groupby(["compression", "gamma"], sort=False):
        tokens_per_step = part["tokens_produced"].mean()
        seconds = step_seconds(part.iloc[:1], [gamma], cost)[0]
        measured = runs[(runs["compression"] == compression) & (runs["gamma"] == gamma)]
        records.append(
            {
                "compression": compression,
                "gamma": gamma,
                "tokens_per_step": tokens_per_step,
                "acceptance_rate": part["acceptance_rate"].mean(),
                "modelled_step_ms": 1e3 * seconds,
                "modelled_tokens_per_s": tokens_per_step / seconds,
                "measured_tokens_per_s": measured["num_tokens"].sum() / measured["elapsed_sec"].sum(),
            }
        )
    return pd.DataFrame(records)


def best_gamma_table(speed: pd.DataFrame, optimal_gamma: pd.DataFrame) -> pd.DataFrame:
    """Per compression, the γ that maximises each criterion."""
    records = []
    for compression, part in speed.groupby("compression", sort=False):
        indexed = part.set_index("gamma")
        oracle = optimal_gamma[optimal_gamma["compression"] == compression]
        records.append(
            {
                "compression": compression,
                "best γ by tokens/step": int(indexed["tokens_per_step"].idxmax()),
                "best γ by modelled tokens/s": int(indexed["modelled_tokens_per_s"].idxmax()),
                "best γ by measured tokens/s": int(indexed["measured_tokens_per_s"].idxmax()),
                "paper's task-oracle γ": ", ".join(
                    f"{t} {g}" for t, g in zip(oracle["task"], oracle["optimal_gamma"], strict=True)
                ),
            }
        )
    return pd.DataFrame(records)


# --------------------------------------------------------------------------------------------
# speckv paper audit: tables


def evaluate_policies(
    rows: pd.DataFrame,
    policy_gammas: dict[str, np.ndarray],
    cost: pd.DataFrame | None,
    by: list[str],
    seed: int,
) -> pd.DataFrame:
    """Each policy scored by replaying its γ on logged steps: tokens/step and, with a cost model,
    tokens/s = Σ tokens / Σ modelled step time. CIs resample prompts.
    """
    frame = _with_policy_columns(rows, policy_gammas)
    records = []
    for labels, part in _groups(frame, by):
        clusters = part["prompt"].to_numpy()
        for policy in policy_gammas:
            chosen, tokens = _replay(part, policy)
            per_step = stats.bootstrap_mean_ci(tokens, CI_RESAMPLES, seed, CONFIDENCE, clusters)
            record = {
                **labels,
                "policy": policy,
                "mean_gamma": chosen.mean(),
                "tokens_per_step": per_step.estimate,
                "ci_low": per_step.low,
                "ci_high": per_step.high,
            }
            if cost is not None:
                seconds = step_seconds(part, chosen, cost)
                rate = stats.bootstrap_ratio_ci(tokens, seconds, CI_RESAMPLES, seed, CONFIDENCE, clusters)
                record |= {"tokens_per_s": rate.estimate, "tps_ci_low": rate.low, "tps_ci_high": rate.high}
            records.append(record)
    return pd.DataFrame(records)


def _with_policy_columns(rows: pd.DataFrame, policy_gammas: dict[str, np.ndarray]) -> pd.DataFrame:
    """The columns a replay needs, plus one `γ|policy` column per policy."""
    frame = rows[["compression", "task", "prompt", "gamma", "accepted"]].copy()
    for policy, gammas in policy_gammas.items():
        frame[f"γ|{policy}"] = gammas
    return frame


def _replay(part: pd.DataFrame, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """A policy's γ per row of a `_with_policy_columns` frame and the tokens each step yields."""
    chosen = part[f"γ|{policy}"].to_numpy()
    return chosen, _identified(replayed_tokens(part["accepted"], part["gamma"], chosen))


def _identified(tokens: np.ndarray) -> np.ndarray:
    """Replayed tokens that must all be known (callers replay on `replay_rows`)."""
    if np.isnan(tokens).any():
        raise ValueError("replayed a γ larger than the logged one on a fully accepted step")
    return tokens


def compare_to_baseline(
    rows: pd.DataFrame, policy_gammas: dict[str, np.ndarray], baseline: str, cost: pd.DataFrame, seed: int
) -> pd.DataFrame:
    """Per compression, paired modelled tokens/s difference of each policy vs `baseline`, with a
    CI and a one-sided p-value for "faster", resampling prompts.
    """
    frame = _with_policy_columns(rows, policy_gammas)
    records = []
    for labels, part in _groups(frame, ["compression"]):
        baseline_gammas, baseline_tokens = _replay(part, baseline)
        baseline_seconds = step_seconds(part, baseline_gammas, cost)
        for policy in policy_gammas:
            if policy == baseline:
                continue
            chosen, tokens = _replay(part, policy)
            interval, p_value = stats.paired_ratio_difference(
                tokens,
                step_seconds(part, chosen, cost),
                baseline_tokens,
                baseline_seconds,
                PVALUE_RESAMPLES,
                seed,
                CONFIDENCE,
                part["prompt"].to_numpy(),
            )
            records.append(
                {
                    **labels,
                    "policy": policy,
                    "baseline": baseline,
                    "tokens_per_s_difference": interval.estimate,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                    "p_one_sided": p_value,
                }
            )
    return pd.DataFrame(records)


def replay_consistency(steps: pd.DataFrame) -> pd.DataFrame:
    """Do the runs of one prompt at different γ agree on which draft tokens the target accepts?

    Each step reveals, per text position, whether the draft's greedy token matched the target's
    (accepted positions match; the first rejected one does not). Greedy decoding should give the
    same text at every γ, so runs must agree wherever two of them reveal the same position; a
    conflict means the target's choice depended on γ (different verification width, different
    numerics), which limits how exact a replay at another γ can be.
    """
    observed = _position_observations(steps)
    per_position = observed.groupby(["compression", "prompt", "position"], sort=False)["match"].agg(
        ["nunique", "size"]
    )
    per_position = per_position[per_position["size"] > 1].reset_index()
    per_prompt = per_position.groupby(["compression", "prompt"], sort=False)["nunique"].max().reset_index()
    records = []
    for compression, positions in per_position.groupby("compression", sort=False):
        prompts = per_prompt[per_prompt["compression"] == compression]
        conflicts = int((positions["nunique"] > 1).sum())
        records.append(
            {
                "compression": compression,
                "prompts": len(prompts),
                "prompts_where_all_runs_agree": int((prompts["nunique"] == 1).sum()),
                "positions_seen_by_2+_runs": len(positions),
                "positions_in_conflict": conflicts,
                "conflict_share": conflicts / len(positions),
            }
        )
    return pd.DataFrame(records)


def _position_observations(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, revealed position): compression, prompt, position in the text, match."""
    accepted = steps["accepted"].to_numpy()
    start = (steps.groupby("run")["tokens_produced"].cumsum() - steps["tokens_produced"]).to_numpy()
    revealed = accepted + (accepted < steps["gamma"].to_numpy())
    step = np.repeat(np.arange(len(steps)), revealed)
    offset = np.arange(len(step)) - np.repeat(np.cumsum(revealed) - revealed, revealed)
    return pd.DataFrame(
        {
            "compression": steps["compression"].to_numpy()[step],
            "prompt": steps["prompt"].to_numpy()[step],
            "position": start[step] + offset,
            "match": offset < accepted[step],
        }
    )


def fixed_gamma_observed(steps: pd.DataFrame, protocol: ProtocolRun, seed: int) -> pd.DataFrame:
    """Per compression and γ: what the runs at γ produced per step, the same replayed from the
    γ = 8 runs (a check of the replay), and the paper's score of Fixed-γ on its test rows.
    """
    scorer = protocol.refit["MLP-16"]
    records = []
    for by in ([], ["compression"]):
        # Both groupings label their groups by compression ("all" when pooled).
        test_rows_of = {labels["compression"]: part for labels, part in _groups(protocol.test_rows, by)}
        for labels, part in _groups(steps, by):
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
                        f"replayed_from_gamma_{max(GAMMAS)}": np.mean(_identified(replayed)),
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
        replayed = evaluate_policies(rows[on_replay_rows], replay_gammas, None, by, seed)
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
            for labels, part in _groups(scores, by)
            for policy in policies
        ]
    )


def signals_by_gamma(steps: pd.DataFrame) -> pd.DataFrame:
    """Mean of each same-step signal per γ: they summarise the γ drafted tokens, so they move with γ."""
    columns = [*STEP_SIGNALS, "acceptance_rate", "tokens_produced"]
    return steps.groupby("gamma")[columns].mean().reset_index()


def signal_correlations(steps: pd.DataFrame) -> pd.DataFrame:
    """Correlation with the step's acceptance rate: its own signals vs the previous step's."""
    later = steps[steps["first_step"] == 0]
    records = []
    for name in [*STEP_SIGNALS, "acceptance_rate"]:
        same = steps[name].corr(steps["acceptance_rate"]) if name in STEP_SIGNALS else np.nan
        records.append(
            {
                "signal": name,
                "corr_same_step": same,
                "corr_previous_step": later[f"prev_{name}"].corr(later["acceptance_rate"]),
            }
        )
    return pd.DataFrame(records)


def leakage_accuracy(steps: pd.DataFrame, folds: dict[tuple[str, str], FoldModels]) -> pd.DataFrame:
    """Out-of-fold accuracy (split by prompt) of each predictor on each feature set."""
    records = []
    for (feature_set, predictor), models in folds.items():
        predicted = out_of_fold(models, steps, lambda model, rows: model.predict(rows))
        actual = steps["acceptance_rate"].to_numpy()
        records.append(
            {
                "features": feature_set,
                "predictor": predictor,
                "r2": r2_score(actual, predicted),
                "mae": mean_absolute_error(actual, predicted),
                "rmse": float(np.sqrt(mean_squared_error(actual, predicted))),
            }
        )
    return pd.DataFrame(records)


def _speckv_gain(model: AcceptancePredictor, rows: pd.DataFrame) -> np.ndarray:
    """Per row, the paper's score of SpecKV's γ minus that of γ = 4 (same predictor)."""
    scores = candidate_scores(model, rows)
    return scores.max(axis=1) - scores[:, GAMMAS.index(4)]


def hygiene_table(protocol: ProtocolRun, steps: pd.DataFrame, folds: dict, seed: int) -> pd.DataFrame:
    """Accuracy and SpecKV − Fixed-4 (paper's score) under three train/test regimes."""
    test_rows = protocol.test_rows
    records = []
    for name in PAPER_PREDICTORS:
        for setup, model in ((PAPER_REGIME, protocol.refit[name]), (ROW_SPLIT, protocol.held_out[name])):
            gain = _speckv_gain(model, test_rows)
            records.append(
                _hygiene_record(setup, name, "steps", test_rows, model.predict(test_rows), gain, None, seed)
            )
        models = folds[(SAME_STEP, name)]
        predicted = out_of_fold(models, steps, lambda model, rows: model.predict(rows))
        gain = out_of_fold(models, steps, _speckv_gain)
        for unit, clusters in (("steps", None), ("prompts", steps["prompt"].to_numpy())):
            records.append(_hygiene_record(PROMPT_SPLIT, name, unit, steps, predicted, gain, clusters, seed))
    return pd.DataFrame(records)


def _hygiene_record(
    setup: str,
    predictor: str,
    unit: str,
    rows: pd.DataFrame,
    predicted: np.ndarray,
    gain: np.ndarray,
    clusters: np.ndarray | None,
    seed: int,
) -> dict:
    """One regime: test accuracy, and SpecKV's paired gain over Fixed-4 with CI and p."""
    actual = rows["acceptance_rate"].to_numpy()
    ci = stats.bootstrap_mean_ci(gain, CI_RESAMPLES, seed, CONFIDENCE, clusters)
    return {
        "setup": setup,
        "predictor": predictor,
        "bootstrap_unit": unit,
        "test_r2": r2_score(actual, predicted),
        "test_mae": mean_absolute_error(actual, predicted),
        "speckv_minus_fixed4": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "p_one_sided": stats.paired_bootstrap_pvalue(
            gain, np.zeros_like(gain), PVALUE_RESAMPLES, seed, clusters
        ),
        "test_steps": len(gain),
    }


def fastest_fixed_gamma_out_of_fold(steps: pd.DataFrame, cost: pd.DataFrame) -> np.ndarray:
    """Per row, the fixed γ with the highest modelled tokens/s for its compression, chosen from
    the other prompts' runs (observed tokens/step at each γ over modelled step time).
    """
    chosen = np.empty(len(steps), dtype=int)
    for fold in np.unique(steps["prompt_index"]):
        held_out = (steps["prompt_index"] == fold).to_numpy()
        tokens = steps[~held_out].groupby(["compression", "gamma"])["tokens_produced"].mean().reset_index()
        rate = tokens["tokens_produced"] / step_seconds(tokens, tokens["gamma"], cost)
        best = tokens.loc[rate.groupby(tokens["compression"]).idxmax()].set_index("compression")["gamma"]
        chosen[held_out] = steps.loc[held_out, "compression"].map(best).to_numpy()
    return chosen


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


# --------------------------------------------------------------------------------------------
# speckv paper audit: the command


def audit(data_dir: str | Path, out_dir: str | Path = "paper-audit", seed: int = 42) -> CommandResult:
    """Re-evaluate the released data honestly and write tables, figures and report.md."""
    data = load_paper_data(data_dir)
    steps, alignment = recover_prompts(data.steps, data.runs)
    steps = add_previous_step_signals(steps)
    data = replace(data, steps=steps)
    protocol = run_protocol(data)
    cost = fit_cost_model(data.runs)
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
        "replay_consistency": replay_consistency(steps),
        "policy_replay": evaluate_policies(replay, replay_gammas, cost, ["compression"], seed),
        "policy_vs_fastest_fixed": compare_to_baseline(replay, replay_gammas, FASTEST_FIXED, cost, seed),
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


# --------------------------------------------------------------------------------------------
# speckv paper audit: conclusions, each computed from the tables


def _row(table: pd.DataFrame, **match) -> pd.Series:
    """The single row of `table` whose columns equal `match`."""
    mask = np.ones(len(table), dtype=bool)
    for column, value in match.items():
        mask &= (table[column] == value).to_numpy()
    if mask.sum() != 1:
        raise ValueError(f"expected one row matching {match}, found {mask.sum()}")
    return table[mask].iloc[0]


def _significance(low: float, high: float) -> str:
    """Direction of a difference from its CI."""
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "not significantly different"


def conclusions(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Claim, what the data supports (with numbers), verdict."""
    return pd.DataFrame(
        [
            _claim_headline(tables),
            _claim_score(tables),
            _claim_signals(tables),
            _claim_held_out(tables),
            _claim_speed(tables),
            _claim_compression(tables),
            _claim_faster(tables),
        ]
    )


def _claim_headline(tables) -> dict:
    scoring = tables["scoring_paper_vs_observed"]
    paper = _row(tables["train_test_hygiene"], setup=PAPER_REGIME, predictor="MLP-16")
    speckv, fixed4, fixed8 = (
        _row(scoring, compression="all", policy=p) for p in ("SpecKV", "Fixed-4", "Fixed-8")
    )
    evidence = (
        f"Paper's score: SpecKV {speckv['paper_score_all_test_rows']:.2f} vs Fixed-4 "
        f"{fixed4['paper_score_all_test_rows']:.2f} tokens/step (+{paper['speckv_minus_fixed4']:.2f}, "
        f"p {format_p(paper['p_one_sided'])}). Observed (replayed on the test steps logged at γ=8): "
        f"SpecKV {ci_text(speckv['tokens_per_step'], speckv['ci_low'], speckv['ci_high'], 2)}, Fixed-4 "
        f"{fixed4['tokens_per_step']:.2f}, Fixed-8 {fixed8['tokens_per_step']:.2f}; SpecKV's mean γ is "
        f"{speckv['mean_gamma']:.1f}."
    )
    beats_fixed8 = speckv["tokens_per_step"] > fixed8["tokens_per_step"]
    beats_fixed4 = speckv["tokens_per_step"] > fixed4["tokens_per_step"]
    verdict = (
        f"{'More' if beats_fixed4 else 'Not more'} tokens/step than Fixed-4, "
        f"{'and' if beats_fixed8 else 'but not'} more than Fixed-8"
        + ("." if beats_fixed8 else ": the gain is that of drafting more tokens.")
    )
    return {
        "claim": "SpecKV produces more tokens per step than Fixed-4",
        "evidence": evidence,
        "verdict": verdict,
    }


def _claim_score(tables) -> dict:
    observed = tables["fixed_gamma_observed"]
    pooled = observed[observed["compression"] == "all"]
    errors = pooled["paper_score"].to_numpy() / pooled["observed_tokens_per_step"].to_numpy() - 1
    pairs = "; ".join(
        f"γ={int(r.gamma)}: {r.paper_score:.2f} vs {r.observed_tokens_per_step:.2f}"
        for r in pooled.itertuples()
    )
    trend = "growing with γ" if np.all(np.diff(errors) > 0) else "not monotone in γ"
    return {
        "claim": "'Expected tokens per step' measures what a policy produces",
        "evidence": f"Paper's Fixed-γ score vs tokens/step observed in the runs at γ: {pairs}.",
        "verdict": f"Biased by {errors.min():+.0%} to {errors.max():+.0%}, {trend}; a policy's own "
        "predictor also scores it.",
    }


def _claim_signals(tables) -> dict:
    accuracy = tables["leakage_accuracy"]
    r2 = {name: _row(accuracy, features=name, predictor="MLP-16")["r2"] for name in FEATURE_SETS}
    same, previous, baseline = (r2[name] for name in FEATURE_SETS)
    correlations = _row(tables["signal_correlations"], signal="min_draft_confidence")
    return {
        "claim": "Draft signals predict acceptance well enough to choose γ",
        "evidence": f"Out-of-fold R² (split by prompt, MLP-16): same-step signals {same:.2f}, previous-step "
        f"signals {previous:.2f}, γ and compression only {baseline:.2f}. Correlation of min confidence with "
        f"acceptance: {correlations['corr_same_step']:.2f} same step, {correlations['corr_previous_step']:.2f} "
        "previous step.",
        "verdict": f"{(same - previous) / same:.0%} of the R² needs signals of the tokens being judged, which "
        "do not exist when γ is chosen.",
    }


def _claim_held_out(tables) -> dict:
    hygiene = tables["train_test_hygiene"]
    rf = [
        _row(hygiene, setup=setup, predictor="RF-100", bootstrap_unit="steps")["test_r2"]
        for setup in (PAPER_REGIME, ROW_SPLIT, PROMPT_SPLIT)
    ]
    by_prompt = _row(hygiene, setup=PROMPT_SPLIT, predictor="MLP-16", bootstrap_unit="prompts")
    return {
        "claim": "Results are on held-out data",
        "evidence": f"RF-100 test R²: {rf[0]:.2f} after the refit on all rows, {rf[1]:.2f} trained on the "
        f"training rows, {rf[2]:.2f} with a split by prompt. SpecKV − Fixed-4 (paper's score) with a prompt "
        f"split and prompt bootstrap: {ci_text(by_prompt['speckv_minus_fixed4'], by_prompt['ci_low'], by_prompt['ci_high'], 2)}.",
        "verdict": "No: test rows are refit on and steps of one prompt sit on both sides, which inflates "
        "accuracy. On the paper's own score SpecKV − Fixed-4 is "
        f"{_significance(by_prompt['ci_low'], by_prompt['ci_high'])} than zero after a prompt split.",
    }


def _claim_speed(tables) -> dict:
    speed = tables["gamma_speed"]
    parts, agree = [], 0
    for _, row in tables["best_gamma"].iterrows():
        rates = speed[speed["compression"] == row["compression"]].set_index("gamma")["measured_tokens_per_s"]
        by_steps, by_time = row["best γ by tokens/step"], row["best γ by measured tokens/s"]
        agree += by_steps == by_time
        parts.append(
            f"{row['compression']}: γ={by_steps} ({rates[by_steps]:.1f} tok/s) vs fastest γ={by_time} ({rates[by_time]:.1f})"
        )
    return {
        "claim": "More tokens per step means faster decoding",
        "evidence": "Best γ by tokens/step vs by measured tokens/s: " + "; ".join(parts) + ".",
        "verdict": f"No: the two criteria agree for {agree} of {len(parts)} compression levels; tokens/step "
        "ignores the draft's cost.",
    }


def _claim_compression(tables) -> dict:
    speed = tables["gamma_speed"]
    by_gamma = speed.groupby("gamma")["acceptance_rate"]
    # Relative change across compressions at equal γ, the largest over γ.
    acceptance_change = (by_gamma.max() / by_gamma.min() - 1).max()
    cost = tables["cost_model"].set_index("compression")
    cost_change = cost["t_verify_ms"].max() / cost["t_verify_ms"].min() - 1
    verify = ", ".join(f"{c} {t:.0f} ms" for c, t in cost["t_verify_ms"].items())
    draft = ", ".join(f"{t:.1f}" for t in cost["t_draft_ms"])
    channel = "the target's cost" if cost_change > acceptance_change else "acceptance"
    return {
        "claim": "Compression changes acceptance, so γ must depend on it",
        "evidence": f"Acceptance rate at equal γ differs by at most {acceptance_change:.1%} across compressions. "
        f"Fitted verification time per step: {verify}; draft time per token {draft} ms (same draft model).",
        "verdict": f"γ must depend on compression, but mainly through {channel}: verification cost changes by "
        f"up to {cost_change:.0%}, acceptance by {acceptance_change:.1%}.",
    }


def replay_bias_table(speed: pd.DataFrame, best: pd.DataFrame, replayed: pd.DataFrame) -> pd.DataFrame:
    """Per compression, how much the replay undervalues the fastest fixed γ.

    The replay starts every step where the γ = 8 runs did, which are harder positions than a
    smaller γ meets on its own, so small-γ policies replay below their on-policy rate.
    """
    on_policy = speed.set_index(["compression", "gamma"])["modelled_tokens_per_s"]
    replay = replayed.set_index(["compression", "policy"])["tokens_per_s"]
    records = []
    for _, row in best.iterrows():
        compression, gamma = row["compression"], row["best γ by modelled tokens/s"]
        rate, replay_rate = on_policy[(compression, gamma)], replay[(compression, f"Fixed-{gamma}")]
        records.append(
            {
                "compression": compression,
                "fastest_fixed_gamma": gamma,
                "on_policy_tokens_per_s": rate,
                "replayed_tokens_per_s": replay_rate,
                "bias_tokens_per_s": rate - replay_rate,
                "bias_share": rate / replay_rate - 1,
            }
        )
    return pd.DataFrame(records)


def _claim_faster(tables) -> dict:
    comparison = tables["policy_vs_fastest_fixed"]
    bias = tables["replay_bias"].set_index("compression")
    parts, verdicts = [], []
    for policy in ("SpecKV (same-step signals)", "SpecKV-cost (previous-step signals)"):
        rows = comparison[comparison["policy"] == policy]
        cells = [
            f"{r.compression} {ci_text(r.tokens_per_s_difference, r.ci_low, r.ci_high, 1)}"
            for r in rows.itertuples()
        ]
        parts.append(f"{policy}: " + ", ".join(cells))
        margin = rows["compression"].map(bias["bias_tokens_per_s"])
        slower = rows.loc[rows["ci_high"] < 0, "compression"].tolist()
        faster = rows.loc[rows["ci_low"] > margin, "compression"].tolist()
        verdicts.append(
            f"{policy}: slower in {', '.join(slower) or 'none'}, faster beyond the replay's bias in "
            f"{', '.join(faster) or 'none'}"
        )
    return {
        "claim": "SpecKV's γ selection speeds up decoding",
        "evidence": "Modelled tokens/s minus that of the fastest fixed γ (replay of the γ=8 steps, paired, by "
        f"prompt): {'; '.join(parts)}. The replay undervalues the fastest fixed γ by "
        + ", ".join(f"{c} {b:.1f} tok/s" for c, b in bias["bias_tokens_per_s"].items())
        + ".",
        "verdict": "; ".join(verdicts) + ".",
    }


# --------------------------------------------------------------------------------------------
# speckv paper audit: report


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
    complete = _row(checks, check="run matches only its own row in its block, all quantities")
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
