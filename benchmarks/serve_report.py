"""The reporting side of benchmarks/serve_load.py: what a load test measured, and its tables.

Pure functions and records, no servers or network: a request's `Outcome`; the sweep's `Cell` (one
configuration at one concurrency), `Probe` (the long-prompt probe) and `ConfigRun` (one server's
cells); percentiles (`p50_p95`, `ms`); the best fixed γ per concurrency; the paired bootstrap of the
`speckv` configuration's margin over the best other (`paired`, `rate_ratio_ci`, `verdict`); the
markdown of a single run (`report`) and of a sweep (`sweep_report`); and the sweep's plot
(`plot_sweep`). Also the few readings of the server options these need (`server_option`,
`is_fixed`, `max_running`), which serve_load.py uses too.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUBJECT = "speckv"  # the configuration measured against the best of the others
BOOTSTRAP_RESAMPLES = 1000
LONG_PROMPT_TOKENS = 4000  # the long-prompt probe's prompt length aimed at
SHORT_TTFT_LIMIT_S = 2.0  # issue #23: the short request's first token within 2 s
TTFT_GROWTH_LIMIT = 2.0  # issue #23: TTFT p95 at 4 clients at most 2x the 1-client one


@dataclass
class Outcome:
    """One request: `index` numbers it within its run (request i reads prompt i, wrapping), which
    pairs the same request across configurations; times are `time.perf_counter()` readings."""

    ok: bool
    index: int
    sent_at: float
    done_at: float
    tokens: int = 0
    prompt_tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at

    @property
    def tpot_s(self) -> float | None:
        if self.first_at is None or self.last_at is None or self.tokens < 2:
            return None
        return (self.last_at - self.first_at) / (self.tokens - 1)

    @property
    def latency_s(self) -> float:
        return self.done_at - self.sent_at


# -- the server options the report reads ---------------------------------------------------


def server_option(extra: list[str], name: str) -> str | None:
    """The value of `name` among the options passed to `speckv serve` (`--name V` or `--name=V`)."""
    for i, part in enumerate(extra):
        if part == name and i + 1 < len(extra):
            return extra[i + 1]
        if part.startswith(name + "="):
            return part.partition("=")[2]
    return None


def is_fixed(server_args: list[str]) -> bool:
    """Whether a configuration drafts a fixed γ: `--controller fixed:N` or `--gamma N`."""
    controller = server_option(server_args, "--controller") or ""
    return controller.startswith("fixed:") or server_option(server_args, "--gamma") is not None


def max_running(args) -> int:
    """Running slots for a sweep's servers: the most clients, and two for the probe."""
    return max([*args.clients, 2 if args.long_prompt_probe else 1])


# -- one run ----------------------------------------------------------------------------------


def p50_p95(values: Sequence[float]) -> tuple[float, float] | None:
    """The median and 95th percentile (numpy's linear interpolation); None without values."""
    if not values:
        return None
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50), float(p95)


def ms(pair: tuple[float, float] | None) -> tuple[str, str]:
    """A p50/p95 pair of seconds as table cells in milliseconds."""
    return ("–", "–") if pair is None else (f"{1e3 * pair[0]:.0f}", f"{1e3 * pair[1]:.0f}")


def report(outcomes: list[Outcome], wall_s: float, spec: dict[str, float], args, extra: list[str]) -> str:
    clients = args.clients[0]
    done = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if not o.ok]
    tokens = sum(o.tokens for o in done)
    ttft = ms(p50_p95([o.ttft_s for o in done if o.ttft_s is not None]))
    tpot = ms(p50_p95([o.tpot_s for o in done if o.tpot_s is not None]))
    acceptance = spec["accepted"] / spec["draft_tokens"] if spec["draft_tokens"] else 0.0
    per_draft = spec["accepted"] / spec["drafts"] if spec["drafts"] else 0.0
    server = "`speckv serve --demo " + " ".join(extra) + "`" if args.demo else f"server at {args.url}"
    lines = [
        "| clients | requests | errors | tokens/s | TTFT p50 (ms) | TTFT p95 | TPOT p50 (ms) | TPOT p95 "
        "| accepted / drafted | accepted per draft step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {clients} | {len(done)} | {len(errors)} | {tokens / wall_s:.1f} | {ttft[0]} | {ttft[1]} "
        f"| {tpot[0]} | {tpot[1]} | {acceptance:.1%} | {per_draft:.2f} |",
    ]
    body = (
        f"### Serving load, {clients} concurrent streaming client{'s' if clients > 1 else ''}\n\n"
        f"{server}, "
        f"greedy chat requests of at most {args.max_tokens} tokens, {tokens} tokens in {wall_s:.1f} s "
        f"on {os.cpu_count()} CPUs.\n\n" + "\n".join(lines) + "\n"
    )
    if errors:
        body += f"\nErrors: {', '.join(sorted(set(errors)))}\n"
    return body


# -- the sweep --------------------------------------------------------------------------------


@dataclass
class Cell:
    """One configuration at one concurrency."""

    config: str
    clients: int
    outcomes: list[Outcome]
    wall_s: float
    spec: dict[str, float]
    rss_mib: tuple[float, float, float]  # before, sampled peak during, after

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def errors(self) -> list[str]:
        return [o.error for o in self.outcomes if not o.ok]

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for o in self.done) / self.wall_s

    @property
    def ttft(self) -> tuple[float, float] | None:
        return p50_p95([o.ttft_s for o in self.done if o.ttft_s is not None])

    @property
    def tpot(self) -> tuple[float, float] | None:
        return p50_p95([o.tpot_s for o in self.done if o.tpot_s is not None])


@dataclass
class Probe:
    """The long-prompt probe: a short request sent while the server reads a long prompt."""

    long: Outcome
    short: Outcome

    @property
    def valid(self) -> bool:
        """Both answered, and the long prompt had no first token yet when the short one was sent."""
        return (
            self.long.ok
            and self.short.ok
            and self.long.first_at is not None
            and self.long.first_at > self.short.sent_at
        )


@dataclass
class ConfigRun:
    name: str
    server_args: list[str]
    cells: list[Cell] = field(default_factory=list)
    failure: str = ""
    rss_idle: float | None = None  # after startup, before any request
    rss_end: float | None = None  # after the last request
    rss_hwm: float | None = None  # VmHWM: the process's peak, sampled or not
    probe: Probe | None = None

    def cell(self, clients: int) -> Cell | None:
        return next((c for c in self.cells if c.clients == clients), None)


def best(cells: Sequence[Cell]) -> Cell | None:
    """The cell with the most tokens/s among those with a finished request."""
    return max((c for c in cells if c.done), key=lambda c: c.tokens_per_s, default=None)


def best_fixed(runs: Sequence[ConfigRun], clients: int) -> Cell | None:
    """The fixed-γ configuration with the most tokens/s at this concurrency."""
    return best([c for r in runs if is_fixed(r.server_args) and (c := r.cell(clients))])


def rate_ratio_ci(
    tokens: np.ndarray, times: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Ratio − 1 of two configurations' rates, Σ tokens / Σ request time, over paired requests
    (column 0 the subject, 1 the other; one row per request), with a 95% percentile bootstrap CI
    that resamples the rows."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(tokens), size=(resamples, len(tokens)))
    rates = tokens[rows].sum(axis=1) / times[rows].sum(axis=1)  # (resamples, 2)
    margins = rates[:, 0] / rates[:, 1] - 1
    point = (tokens[:, 0].sum() / times[:, 0].sum()) / (tokens[:, 1].sum() / times[:, 1].sum()) - 1
    low, high = np.percentile(margins, [2.5, 97.5])
    return float(point), float(low), float(high)


def paired(subject: Sequence[Outcome], other: Sequence[Outcome]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and request times (rows: requests both configurations finished, by index)."""
    ours = {o.index: o for o in subject if o.ok and o.tokens > 0}
    theirs = {o.index: o for o in other if o.ok and o.tokens > 0}
    common = sorted(ours.keys() & theirs.keys())
    tokens = np.array([[ours[i].tokens, theirs[i].tokens] for i in common], dtype=float).reshape(-1, 2)
    times = np.array([[ours[i].latency_s, theirs[i].latency_s] for i in common]).reshape(-1, 2)
    return tokens, times


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "yes (CI above 0)"
    if high < 0:
        return "NO (CI below 0)"
    return "not resolved (CI spans 0)"


def margin_rows(runs: Sequence[ConfigRun], clients: Sequence[int]) -> list[str]:
    """Per concurrency: SpecKV against the best other configuration, the margin and its CI."""
    subject = next((r for r in runs if r.name == SUBJECT), None)
    rows = []
    for count in clients:
        ours = subject.cell(count) if subject else None
        rival = best([c for r in runs if r.name != SUBJECT and (c := r.cell(count))])
        if ours is None or not ours.done or rival is None:
            rows.append(f"| {count} | – | – | – | – | 0 | – |")
            continue
        tokens, times = paired(ours.outcomes, rival.outcomes)
        if len(tokens) < 2:
            margin, judged = "– (fewer than 2 paired requests)", "–"
        else:
            point, low, high = rate_ratio_ci(tokens, times)
            margin, judged = f"{point:+.1%} [{low:+.1%}, {high:+.1%}]", verdict(low, high)
        rows.append(
            f"| {count} | {ours.tokens_per_s:.1f} | {rival.config} | {rival.tokens_per_s:.1f} | {margin} "
            f"| {len(tokens)} | {judged} |"
        )
    return rows


def cell_row(cell: Cell, fixed_best: bool) -> str:
    ttft, tpot = ms(cell.ttft), ms(cell.tpot)
    drafted = cell.spec["draft_tokens"]
    acceptance = f"{cell.spec['accepted'] / drafted:.1%}" if drafted else "–"
    rss = " / ".join(f"{value:.0f}" for value in cell.rss_mib)
    name = f"{cell.config} (best fixed γ)" if fixed_best else cell.config
    return (
        f"| {cell.clients} | {name} | {len(cell.done)} | {len(cell.errors)} | {cell.tokens_per_s:.1f} "
        f"| {ttft[0]} | {ttft[1]} | {tpot[0]} | {tpot[1]} | {acceptance} | {rss} |"
    )


def ttft_growth(run: ConfigRun) -> str:
    """TTFT p95 at 4 clients over that at 1, and whether it is within the issue's 2x."""
    one, four = run.cell(1), run.cell(4)
    if one is None or four is None or one.ttft is None or four.ttft is None:
        return "–"
    growth = four.ttft[1] / one.ttft[1]
    return f"{growth:.2f}× ({'yes' if growth <= TTFT_GROWTH_LIMIT else 'NO'})"


def probe_cells(probe: Probe | None) -> str:
    """Long prompt tokens | its TTFT (s) | short request TTFT (s, within 2 s?)."""
    if probe is None:
        return "– | – | –"
    if not (probe.long.ok and probe.short.ok):
        failed = probe.long if not probe.long.ok else probe.short
        return f"failed: {failed.error.replace('|', '/')} | – | –"
    long_ttft = f"{probe.long.ttft_s:.2f}" if probe.long.ttft_s is not None else "–"
    short = probe.short.ttft_s
    if short is None or not probe.valid:
        # The long prompt's first token came before the short request was sent: nothing measured.
        return f"{probe.long.prompt_tokens} | {long_ttft} | – (read before the short request came)"
    return f"{probe.long.prompt_tokens} | {long_ttft} | {short:.2f} ({'yes' if short <= SHORT_TTFT_LIMIT_S else 'NO'})"


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def sweep_report(runs: Sequence[ConfigRun], args, extra: list[str], figure: str | None) -> str:
    clients = args.clients
    common = " ".join(extra)
    ran = [r for r in runs if r.cells]
    lines = [
        f"### Serving load sweep: {len(runs)} server configurations × {', '.join(map(str, clients))} "
        "concurrent streaming clients",
        "",
        f"Each configuration is its own `speckv serve --demo {common}` process with the options below"
        f"{'' if server_option(extra, '--max-running') else f' and `--max-running {max_running(args)}`'}"
        f", on {os.cpu_count()} CPUs. Per cell: greedy streaming chat requests from the test split of "
        f"the mixed prompt set (tasks interleaved, the same requests in every cell), at most "
        f"{args.max_tokens} tokens{' (EOS ignored)' if args.ignore_eos else ''}, at most "
        f"{args.requests} requests or {args.duration:g} s; one request per server beforehand, not "
        "counted, warms it up. RSS is the server process's VmRSS (MiB) before the cell, its peak "
        "sampled every 50 ms during the cell, and after.",
        "",
        *(f"- `{r.name}`: `{shlex.join(r.server_args)}`" for r in runs),
        "",
        "| clients | config | requests | errors | tokens/s | TTFT p50 (ms) | TTFT p95 | TPOT p50 (ms) "
        "| TPOT p95 | accepted / drafted | RSS before / peak / after (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for count in clients:
        fixed = best_fixed(runs, count)
        lines += [cell_row(c, c is fixed) for r in ran if (c := r.cell(count))]
    if any(r.name == SUBJECT for r in runs):
        lines += [
            "",
            f"`{SUBJECT}` against the best other configuration at each concurrency (most tokens/s). "
            "The margin compares the two rates Σ tokens / Σ request time over the requests both "
            f"finished (the same prompts); 95% CI from {BOOTSTRAP_RESAMPLES} bootstrap resamples of "
            "those requests.",
            "",
            f"| clients | {SUBJECT} tokens/s | best other | its tokens/s | margin [95% CI] "
            f"| paired requests | {SUBJECT} ≥ best? |",
            "|---:|---:|---|---:|---|---:|---|",
            *margin_rows(runs, clients),
        ]
    else:
        lines += ["", f"No `{SUBJECT}` configuration in this sweep, so no margin."]
    probe = (
        f"; the long-prompt probe sends a ~{LONG_PROMPT_TOKENS}-token prompt (test-split articles) "
        "and, once the server has admitted it, a short chat request, whose first token the issue "
        f"asks within {SHORT_TTFT_LIMIT_S:g} s"
    )
    lines += [
        "",
        "Per server: RSS (MiB) idle after startup, at the end, and the process's peak (VmHWM); TTFT "
        f"p95 at 4 clients over that at 1 (the issue asks at most {TTFT_GROWTH_LIMIT:g}×)"
        f"{probe if args.long_prompt_probe else ''}.",
        "",
        "| config | RSS idle | RSS end | RSS peak (VmHWM) | TTFT p95, 4 vs 1 clients | long prompt (tokens) "
        "| its TTFT (s) | short request TTFT (s) |",
        "|---|---:|---:|---:|---|---:|---:|---|",
        *(
            f"| {r.name} | {mib(r.rss_idle)} | {mib(r.rss_end)} | {mib(r.rss_hwm)} | {ttft_growth(r)} "
            f"| {probe_cells(r.probe)} |"
            for r in ran
        ),
    ]
    failures = [f"- `{r.name}`: {r.failure}" for r in runs if r.failure]
    if failures:
        lines += ["", "Failed:", "", *failures]
    errors = [
        f"- `{c.config}` at {c.clients} clients: {', '.join(sorted(set(c.errors)))}"
        for r in ran
        for c in r.cells
        if c.errors
    ]
    if errors:
        lines += ["", "Request errors:", "", *errors]
    if figure:
        lines += ["", f"![tokens/s and TPOT p50 against concurrency]({figure})"]
    return "\n".join(lines) + "\n"


def plot_sweep(runs: Sequence[ConfigRun], path: Path) -> Path:
    """Total tokens/s and TPOT p50 against concurrency, one line per configuration."""
    from matplotlib.figure import Figure

    from speckv.util.reporting import save_figure

    fig = Figure(figsize=(10.0, 4.0))
    throughput, tpot = fig.subplots(1, 2)
    counts = sorted({c.clients for r in runs for c in r.cells})
    for run in runs:
        cells = [c for c in run.cells if c.done]
        if not cells:
            continue
        x = [c.clients for c in cells]
        throughput.plot(x, [c.tokens_per_s for c in cells], marker="o", label=run.name)
        tpot.plot(x, [1e3 * c.tpot[0] if c.tpot else np.nan for c in cells], marker="o", label=run.name)
    for ax, label in ((throughput, "completion tokens/s, all clients"), (tpot, "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    throughput.legend(fontsize="small")
    return save_figure(fig, path)
