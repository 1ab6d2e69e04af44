"""The paper's released CSVs: their layout, and loading them with every check both commands need.

Any problem with the data (a missing file or column, a non-numeric value, an unknown label, or
a file cut short) is one `SpecKVError` line, raised before any computation starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from speckv.errors import SpecKVError

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

# The levels the paper reports; every compression × γ × task combination (a "cell") must be in
# the data, since the protocol summarises whatever rows it is given.
GAMMAS = (2, 4, 6, 8)
COMPRESSION_CODE = {"fp16": 0, "int8": 1, "nf4": 2}
TASKS = ("code", "math", "chat", "summarization")
_CELL = ["compression", "gamma", "task"]


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
    _check_complete(steps, runs, optimal_gamma, data_dir)
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


def _check_complete(
    steps: pd.DataFrame, runs: pd.DataFrame, optimal_gamma: pd.DataFrame, data_dir: Path
) -> None:
    """Every compression × γ × task the paper reports must be there, with all its logged steps.

    The protocol summarises whatever rows it is given, so a file cut short would otherwise
    yield a complete-looking report on part of the data.
    """
    for name, frame in ((STEP_FILE, steps), (RUN_FILE, runs)):
        missing = _missing_cells(frame, _CELL)
        if missing:
            raise SpecKVError(f"{data_dir / name} is incomplete: no rows for {_describe_cells(missing)}")
    missing = _missing_cells(optimal_gamma, ["compression", "task"])
    if missing:
        pairs = ", ".join(f"{compression} {task}" for compression, task in missing)
        raise SpecKVError(f"{data_dir / ORACLE_FILE} is incomplete: no optimal γ for {pairs}")
    # A cut at a line boundary leaves every cell present: compare with the steps the runs record.
    logged = steps.groupby(_CELL).size()
    recorded = runs.groupby(_CELL)["num_steps"].sum()
    short = [cell for cell, total in recorded.items() if logged.get(cell, 0) != total]
    if short:
        compression, gamma, task = short[0]
        others = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        raise SpecKVError(
            f"{data_dir / STEP_FILE} is incomplete: {logged.get(short[0], 0)} steps for {compression} "
            f"γ={gamma} {task} where {RUN_FILE} records {recorded[short[0]]}{others}"
        )


def _missing_cells(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
    """The combinations of the paper's levels of `columns` that have no row in `frame`."""
    levels = {"compression": list(COMPRESSION_CODE), "gamma": GAMMAS, "task": TASKS}
    present = set(frame[columns].itertuples(index=False, name=None))
    return [cell for cell in itertools.product(*(levels[c] for c in columns)) if cell not in present]


def _describe_cells(missing: list[tuple]) -> str:
    """Missing (compression, γ, task) cells, e.g. 'int8 γ=4, 6 (every task), γ=2 (chat); nf4 (every γ and task)'."""
    parts = []
    for compression in COMPRESSION_CODE:
        tasks_of = {gamma: [t for c, g, t in missing if (c, g) == (compression, gamma)] for gamma in GAMMAS}
        whole = [gamma for gamma in GAMMAS if len(tasks_of[gamma]) == len(TASKS)]
        partial = [
            f"γ={gamma} ({', '.join(tasks)})"
            for gamma, tasks in tasks_of.items()
            if 0 < len(tasks) < len(TASKS)
        ]
        if len(whole) == len(GAMMAS):
            parts.append(f"{compression} (every γ and task)")
        elif whole or partial:
            pieces = ([f"γ={', '.join(map(str, whole))} (every task)"] if whole else []) + partial
            parts.append(f"{compression} {', '.join(pieces)}")
    return "; ".join(parts)
