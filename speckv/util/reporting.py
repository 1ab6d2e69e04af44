"""Generic helpers for written reports: tables as CSV + Markdown, and a few standard figures.

Figures are built on `matplotlib.figure.Figure`, which renders through the Agg backend without
pyplot, so no display is needed and the caller's pyplot state is left alone. They are PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# PNG metadata without the matplotlib version, so reruns write identical files.
_PNG_METADATA = {"Software": None}


def format_cell(value, digits: int = 3) -> str:
    """One table cell: floats rounded to `digits` decimals, missing values blank."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of `frame` (index not included)."""
    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(format_cell(value, digits).replace("|", "\\|") for value in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def write_table(frame: pd.DataFrame, out_dir: Path, name: str, digits: int = 3) -> str:
    """Write `name`.csv (full precision) and `name`.md; return the Markdown text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / f"{name}.csv", index=False)
    text = markdown_table(frame, digits)
    (out_dir / f"{name}.md").write_text(text + "\n")
    return text


def figure_markdown(path: Path, caption: str, relative_to: Path) -> str:
    """A Markdown image line for a figure, with a path relative to the report's folder."""
    return f"![{caption}]({path.relative_to(relative_to).as_posix()})"


def grouped_bars(
    frame: pd.DataFrame,
    category: str,
    group: str,
    value: str,
    path: Path,
    title: str,
    ylabel: str,
    low: str | None = None,
    high: str | None = None,
) -> Path:
    """Bars of `value` per `category` (x axis), one colour per `group`, optional CI whiskers."""
    categories = list(dict.fromkeys(frame[category]))
    groups = list(dict.fromkeys(frame[group]))
    width = 0.8 / len(groups)
    fig, ax = _new_figure(max(6.0, 0.3 * len(categories) * len(groups) + 2), 4.5)
    for position, name in enumerate(groups):
        part = frame[frame[group] == name].set_index(category).reindex(categories)
        x = np.arange(len(categories)) + (position - (len(groups) - 1) / 2) * width
        errors = None
        if low is not None and high is not None:
            errors = np.vstack([part[value] - part[low], part[high] - part[value]])
        ax.bar(x, part[value], width, yerr=errors, capsize=3, label=str(name))
    ax.set_xticks(np.arange(len(categories)), [str(c) for c in categories])
    _zoom_to_data(ax, frame, value, low)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Below the axes, so that it never hides bars.
    ax.legend(fontsize="small", ncols=min(len(groups), 3), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return save_figure(fig, path)


def _zoom_to_data(ax, frame: pd.DataFrame, value: str, low: str | None) -> None:
    """Start the y axis near the smallest bar so that small differences stay visible."""
    bottom = frame[low if low else value].min()
    top = ax.get_ylim()[1]
    if top > bottom:  # bars all at the top (all zero, say): the autoscaled axis shows them
        ax.set_ylim(max(0.0, bottom - 0.15 * (top - bottom)), top)


def scatter_predicted_actual(
    predicted: np.ndarray,
    actual: np.ndarray,
    path: Path,
    title: str,
    groups: Sequence | None = None,
    label: str = "value",
) -> Path:
    """Predicted vs actual scatter with the y = x line; optional colour per group."""
    fig, ax = _new_figure(5.0, 5.0)
    labels = np.asarray(groups) if groups is not None else np.full(len(actual), "")
    for name in dict.fromkeys(labels):
        chosen = labels == name
        ax.scatter(actual[chosen], predicted[chosen], s=6, alpha=0.35, label=str(name) or None)
    limits = [min(np.min(actual), np.min(predicted)), max(np.max(actual), np.max(predicted))]
    ax.plot(limits, limits, color="black", linewidth=1, label="y = x")
    ax.set_xlabel(f"actual {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title)
    ax.legend(fontsize="small", markerscale=2)
    return save_figure(fig, path)


def line_chart(frame: pd.DataFrame, x: str, y: str, series: str, path: Path, title: str, ylabel: str) -> Path:
    """One line with markers per `series` value: `y` against `x`."""
    fig, ax = _new_figure(6.0, 4.0)
    for name, part in frame.groupby(series, sort=False):
        ax.plot(part[x], part[y], marker="o", label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def _new_figure(width: float, height: float):
    """A pyplot-free figure with one axes."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig: Figure, path: Path) -> Path:
    """Save as PNG with reproducible bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=_PNG_METADATA)
    return path


@dataclass
class MarkdownReport:
    """A report.md under construction: tables (tables/*.csv, *.md) and figures are written as added."""

    out_dir: Path
    title: str
    blocks: list[str] = field(default_factory=list)

    def text(self, markdown: str) -> None:
        self.blocks.append(markdown.strip())

    def table(
        self, name: str, frame: pd.DataFrame, shown: pd.DataFrame | None = None, digits: int = 3
    ) -> None:
        """Write tables/`name`.csv and .md from `frame`; show `shown` (default: `frame`) in the report."""
        written = write_table(frame, self.out_dir / "tables", name, digits)
        self.blocks.append(written if shown is None else markdown_table(shown, digits))

    def figure_path(self, name: str) -> Path:
        """Where this report keeps its figure `name` (PNG)."""
        return self.out_dir / "figures" / f"{name}.png"

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(figure_markdown(path, caption, self.out_dir) + f"\n\n*{caption}*")

    def write(self) -> Path:
        """Write report.md and return its path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "report.md"
        path.write_text(f"# {self.title}\n\n" + "\n\n".join(self.blocks) + "\n")
        return path
