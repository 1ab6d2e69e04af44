"""One target pass for a batch: what it costs, and how its verify slots are shared out.

In a batch the target pass pads every sequence's tokens to the widest row
(`speckv.decoding.slots`), so its time is a function of the rows and that width, t_pass(rows,
width), and a sequence may verify up to width - 1 drafted tokens at no extra cost. Sharing the
pass is therefore one choice per tick, the width: each drafted token a sequence offers is worth
its reach (the probability that it and every token before it are accepted), and widening the
pass by one costs every row. `share_verify` picks the width that maximises the batch's expected
tokens minus λ times the pass time (λ: the batch's measured tokens/s; Dinkelbach, as for one
sequence), so a sequence whose draft is unreliable yields to one whose draft is reliable, and
the pass stays narrow where the batch is large and widening it costs more than it yields.

`BatchCosts` is t_pass: a prior from the cost curve of one sequence (the pass over rows × width
tokens; beyond the curve, its last point plus the prefill time per token), followed live from
every tick's measured pass, per (rows, width), as `live.LiveCosts` follows one sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from speckv.costs import CostModel

_CLIP = math.log(2.0)  # one stall moves the estimate as if it were 2× off, no more


class BatchCosts:
    """t_pass(rows, width): seconds of one target pass over `rows` sequences, the widest feeding
    `width` tokens. log t = log prior + g + r(rows, width): `g` follows the whole machine, `r` what
    one shape showed of its own (exponential averages of clipped log errors).

    The prior: the batch passes measured on this machine (`CostModel.t_pass_s`, by `serve` at
    startup), linear in the rows between the batch sizes measured (one row: the curve of one
    sequence); without them, the one-sequence curve at rows × width tokens. Past the widths
    measured, each extra token of every row costs about the prefill's time per token."""

    def __init__(self, prior: CostModel, machine_weight: float = 0.1, shape_weight: float = 0.3):
        self.curve = np.asarray(prior.t_verify_s, float)
        self.measured = {1: self.curve, **{r: np.asarray(t, float) for r, t in prior.t_pass_s.items()}}
        measured_slope = (self.curve[-1] - self.curve[0]) / max(len(self.curve) - 1, 1)
        self.slope = prior.target_prefill_s_per_token or measured_slope
        self.machine_weight, self.shape_weight = machine_weight, shape_weight
        self.machine = 0.0
        self.shape: dict[tuple[int, int], float] = {}

    def prior(self, rows: int, width: int) -> float:
        rows, width = max(rows, 1), max(width, 1)
        if len(self.measured) == 1:  # one sequence's curve only: a pass over rows × width tokens
            return self._along(self.curve, rows * width, 1)
        sizes = sorted(self.measured)
        below = max((r for r in sizes if r <= rows), default=sizes[0])
        above = min((r for r in sizes if r >= rows), default=sizes[-1])
        if below == above:  # measured, or past the largest batch measured: on from the two largest
            if rows <= sizes[-1]:
                return self._along(self.measured[rows], width, rows)
            below, above = sizes[-2], sizes[-1]
        low = self._along(self.measured[below], width, below)
        high = self._along(self.measured[above], width, above)
        return max(low + (high - low) * (rows - below) / (above - below), 1e-6)

    def _along(self, times: np.ndarray, tokens: int, rows: int) -> float:
        """`times` at `tokens`, or past its end by the prefill's time per extra token of each row."""
        if tokens <= len(times):
            return float(times[tokens - 1])
        return float(times[-1] + self.slope * rows * (tokens - len(times)))

    def pass_time(self, rows: int, width: int) -> float:
        residual = self.machine + self.shape.get((rows, width), 0.0)
        return self.prior(rows, width) * math.exp(residual)

    def pass_times(self, rows: int, widths: int) -> np.ndarray:
        """t_pass(rows, k) for k = 1..widths."""
        return np.array([self.pass_time(rows, k) for k in range(1, widths + 1)])

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """A measured pass."""
        if seconds <= 0 or rows < 1 or width < 1:
            return
        error = math.log(seconds) - math.log(self.pass_time(rows, width))
        error = min(max(error, -_CLIP), _CLIP)
        self.machine += self.machine_weight * error
        key = (rows, width)
        self.shape[key] = self.shape.get(key, 0.0) + self.shape_weight * (1.0 - self.machine_weight) * error


def share_verify(
    reaches: Sequence[Sequence[float] | None],
    drafted: Sequence[int],
    bases: Sequence[int],
    floor: int,
    pass_time: Callable[[int], float],
    rate: float | None,
    sunk_s: float = 0.0,
) -> list[int]:
    """How many of its drafted tokens each sequence of a batch verifies.

    Sequence i feeds `bases[i]` tokens whatever it verifies (the last verified ones, its prompt's
    rest) and then its drafted tokens. `reaches[i]`: P(the first j drafted tokens are all accepted),
    j = 1..drafted[i] (non-increasing), or None to verify all it drafted (a token tree, a probe,
    sampling). `floor`: the widest row that feeds anyway (a prompt chunk). `pass_time(width)`: the
    pass's seconds with `width` tokens in its widest row. The width w maximises
    Σ_i (1 + Σ_{j ≤ min(d_i, w - base_i)} reach_ij) − rate·t_pass(w) (with no rate yet: expected
    tokens per second of `sunk_s` + the pass); sequence i verifies min(d_i, w − base_i), since
    within the width a token costs nothing."""
    rows = list(zip(reaches, drafted, bases, strict=True))
    forced = max([floor, 1, *(b + (d if r is None else 0) for r, d, b in rows)])
    widest = max([forced, *(b + d for _, d, b in rows)])

    def kept(width: int) -> list[int]:
        return [d if r is None else max(0, min(d, width - b)) for r, d, b in rows]

    best_width, best_value = forced, -math.inf
    for width in range(forced, widest + 1):
        expected = sum(
            1.0 + (k if r is None else float(sum(r[:k])))
            for (r, _, _), k in zip(rows, kept(width), strict=True)
        )
        seconds = pass_time(width)
        value = expected - rate * seconds if rate else expected / (sunk_s + seconds)
        if value > best_value + 1e-12:
            best_width, best_value = width, value
    return kept(best_width)


@dataclass(frozen=True)
class SharedPass:
    """What the controllers of a batch see of the pass they share, before a tick."""

    pass_times: np.ndarray  # seconds as the widest row feeds k = 1.. tokens
    tick: int  # the batch's tick count: sequences that probe do it on the same ticks


class SharedVerifyBudget:
    """A batch's shared target pass for SpecKV controllers: the pass times they plan their
    drafting with at this batch size, the tick count they align their probes on (a probe's draft
    pass and wider verification cost the batch about as much for one sequence as for all), and
    the width every sequence's verification shares."""

    def __init__(self, prior: CostModel):
        self.costs = BatchCosts(prior)
        self.widths = prior.gamma_max + 1
        self.ticks = 0

    def start_tick(self, rows: int) -> SharedPass:
        self.ticks += 1
        return SharedPass(self.costs.pass_times(rows, self.widths), self.ticks)

    def share(
        self,
        rows: int,
        reaches: Sequence[Sequence[float] | None],
        drafted: Sequence[int],
        bases: Sequence[int],
        floor: int,
        rate: float | None,
        sunk_s: float = 0.0,
    ) -> list[int]:
        """`share_verify` with this batch's pass times over `rows` rows."""
        return share_verify(
            reaches, drafted, bases, floor, lambda width: self.costs.pass_time(rows, width), rate, sunk_s
        )

    def observe(self, rows: int, width: int, seconds: float) -> None:
        self.costs.observe(rows, width, seconds)
