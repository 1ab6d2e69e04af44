"""What both commands share to present results: bootstrap settings, per-group iteration, CI and
p-value text, row lookup in a result table, and the `CommandResult` they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CI_RESAMPLES = 5000
PVALUE_RESAMPLES = 10000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class CommandResult:
    """What a `speckv paper` command produced."""

    report_path: Path
    summary: str
    tables: dict[str, pd.DataFrame]


def labelled_groups(frame: pd.DataFrame, by: list[str]):
    """(labels, part) for each group of `by`, or one group labelled compression=all."""
    if not by:
        yield {"compression": "all"}, frame
        return
    for key, part in frame.groupby(by, sort=False):
        yield dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), part


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


def format_p(p_value: float) -> str:
    """A bootstrap p-value; 0 is shown as below the resolution 1/PVALUE_RESAMPLES."""
    return f"< {1 / PVALUE_RESAMPLES:.0e}" if p_value == 0 else f"{p_value:.4f}"


def single_row(table: pd.DataFrame, **match) -> pd.Series:
    """The single row of `table` whose columns equal `match`."""
    mask = np.ones(len(table), dtype=bool)
    for column, value in match.items():
        mask &= (table[column] == value).to_numpy()
    if mask.sum() != 1:
        raise ValueError(f"expected one row matching {match}, found {mask.sum()}")
    return table[mask].iloc[0]
