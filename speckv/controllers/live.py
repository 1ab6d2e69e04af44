"""What the SpecKV controller learns while it decodes: the cost of a step on this machine now,
how well its acceptance predictions hold on this text, and the rate λ it achieves.

A controller file is fitted elsewhere: its acceptance models on other prompts, and any cost curve
on another machine, thread count or load. These estimates start from what the controller
was given and follow what each step shows, in O(1) per step:

- `LiveCosts`: the target pass over k tokens and the draft per token, as a robust running
  estimate per width, so a busy neighbour, another thread count or thermal drift moves the
  decisions;
- `LiveAcceptance`: a running calibration of predicted against observed acceptance, by
  predicted-probability bin, within each sequence and carried at half weight into the next, so on text where the draft does worse than on its training data the
  controller drafts less, and where it does better, more;
- `CopyChances`: the same for copied tokens (n-gram candidates), by the length of the match they
  continue;
- `RateTracker`: λ, the tokens per second the controller achieves (Dinkelbach: a policy
  maximising E[tokens] − λ·time per step with λ its own achieved rate maximises tokens/s);
- `SignalSpread`: how far a drafted first token's own signals move its predicted acceptance from
  what the context alone predicts, which prices a peek: drafting one token to look at it.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from speckv.costs import CostModel
from speckv.records import CopyMatch

# A step time more than this factor off the estimate moves it as if it were this factor off: one
# stall (a page fault, the garbage collector, a neighbour's burst) cannot swing the plan.
_CLIP = math.log(2.0)


class LiveCosts:
    """The cost model in force, refined by measured step times.

    log t_verify(k) = log prior(k) + g + r_k: `g` moves every width together (the whole machine got
    slower or faster), `r_k` is what width k showed of its own, so widths seldom verified still
    follow the load. Both are exponential averages of log-time errors clipped to ±log 2 (robust to
    stalls). The draft's time per token is an exponential average of its own."""

    def __init__(self, prior: CostModel, machine_weight: float = 0.1, width_weight: float = 0.2):
        self.machine_weight, self.width_weight = machine_weight, width_weight
        self.use(prior)

    def use(self, prior: CostModel) -> None:
        """Start again from `prior` (e.g. a curve just measured on this machine)."""
        self.prior = prior
        self._log_prior = np.log(np.maximum(np.asarray(prior.t_verify_s, float), 1e-9))
        self.machine = 0.0
        self.width = np.zeros(len(self._log_prior))
        self.t_draft_s = prior.t_draft_s

    @property
    def gamma_max(self) -> int:
        return self.prior.gamma_max

    def t_verify(self) -> np.ndarray:
        """The estimated t_verify(k), k = 1..K, as measured (dips included)."""
        return np.exp(self._log_prior + self.machine + self.width)

    def step_time(self, record, copied: bool = False) -> float:
        """The modelled seconds of a step like `record`: what the achieved rate is measured in.
        `copied`: its tokens came without a draft pass (n-gram candidates)."""
        k = min(record.gamma, self.gamma_max)  # one width: no need for the whole curve, every step
        verify = math.exp(self._log_prior[k] + self.machine + self.width[k])
        drafting = 0.0 if copied else record.drafted * self.t_draft_s
        return drafting + verify + self.prior.t_step_s

    def observe(self, record, verify: bool = True) -> None:
        """Fold in a step's measured times (`verify` False: its drafting only). The first step of a
        sequence reads the prompt and is skipped; so are widths beyond the curve. A later step whose
        draft model first read the tokens it sat out (`StepRecord.draft_read`) counts its drafting
        without that reading."""
        if record.step == 0 or record.gamma > self.gamma_max or record.verify_time_s <= 0:
            return
        if verify:
            k = record.gamma
            error = math.log(record.verify_time_s) - (self._log_prior[k] + self.machine + self.width[k])
            error = min(max(error, -_CLIP), _CLIP)
            self.machine += self.machine_weight * error
            self.width[k] += self.width_weight * (1.0 - self.machine_weight) * error
        # Copied tokens (n-gram candidates) ran no draft pass: the time is the model's tokens',
        # less its first pass's reading of what it sat out (the prompt, tokens copied since).
        modelled = record.drafted - record.copied
        drafting = record.draft_time_s - self.prior.read_time(record.draft_read)
        if modelled > 0 and drafting > 0:
            per_token = drafting / modelled
            ratio = min(max(per_token / max(self.t_draft_s, 1e-9), 0.5), 2.0)
            self.t_draft_s *= ratio**self.width_weight


class LiveAcceptance:
    """Running calibration of the acceptance model, per sequence (`new_sequence` halves the
    evidence, `reset` forgets it): corrected(p) = p · ratio of the
    prediction's bin, ratio = (observed + m·R) / (predicted + m) over the bin's judged tokens,
    shrunk to the sequence-wide ratio R = (observed + m) / (predicted + m), itself shrunk to 1.
    With nothing observed the model is used as it is; `m` (pseudo-tokens) sets how fast it moves."""

    BINS = 5

    def __init__(self, strength: float = 6.0):
        self.strength = strength
        self.reset()

    def reset(self) -> None:
        self.observed = np.zeros(self.BINS)
        self.predicted = np.zeros(self.BINS)
        self._ratios = np.ones(self.BINS)

    def new_sequence(self) -> None:
        """A new sequence of the same stream keeps half the evidence: text like the last is the
        best guess, and a controller that rarely drafts sees few tokens within one sequence."""
        self.observed *= 0.5
        self.predicted *= 0.5
        self._update()

    def correct(self, probability: float) -> float:
        """The calibrated P(accepted) for a raw prediction (clipped to [0, 1] first)."""
        p = min(max(probability, 0.0), 1.0)
        return min(p * self._ratios[min(int(p * self.BINS), self.BINS - 1)], 0.999)

    def correct_many(self, probabilities: np.ndarray) -> np.ndarray:
        p = np.clip(probabilities, 0.0, 1.0)
        return np.minimum(p * self._ratios[np.minimum((p * self.BINS).astype(int), self.BINS - 1)], 0.999)

    def observe(self, predicted: list[float], accepted: int) -> None:
        """A step's judged tokens: raw predictions of the verified tokens in order, `accepted` of
        them accepted; tokens after the first rejection were never judged."""
        judged = predicted[: accepted + 1]
        for i, p in enumerate(judged):
            b = min(int(min(max(p, 0.0), 1.0) * self.BINS), self.BINS - 1)
            self.predicted[b] += p
            self.observed[b] += 1.0 if i < accepted else 0.0
        if judged:
            self._update()

    def _update(self) -> None:
        m = self.strength
        overall = (self.observed.sum() + m) / (self.predicted.sum() + m)
        self._ratios = (self.observed + m * overall) / (self.predicted + m)


class CopyChances:
    """P(a copied token is accepted | the step's earlier copies were), by the length of the earlier
    match it continues and whether that match was always followed by the copied token (n-gram
    candidates, `speckv.decoding.drafters.ngram`).

    A copy continues an earlier occurrence of the sequence's last L tokens; once it is accepted the
    next copy continues an occurrence of L + 1 (that same one, with the token just copied), so a
    step's copies continue matches of L, L + 1, …. The match's length says much of a copy, and so
    does whether its followers agree (`PRIOR`): first copies were accepted 30 % of the time after
    a unanimous 1-token match and 14 % after a split one, 83 % and 33 % after 4 or more tokens.
    Before a step only its first copy's followers are known (`CopyMatch`); later copies count at
    their length's mix of the two (`UNANIMOUS_SHARE`), and at their own once drafted.

    Per bin, a running estimate (accepted + m·R·prior) / (judged + m), with R = (accepted + m) /
    (expected + m) over every bin: text where copies fare badly lowers every chance at once, and
    each bin learns its own. A new sequence keeps half the evidence, as `LiveAcceptance` does."""

    # First copies accepted after a match of 1, 2, 3 and 4 or more tokens, [split, unanimous]: the
    # demo target's bf16 output, 64 tokens for each of 6 dev-split prompts of each task (1,070
    # copies: 441, 167, 95 and 367 by length). Split matches of 3 and of 4+ tokens (9 and 34
    # copies) are pooled. Unanimous after 1 token: 0.20 on chat to 0.41 on summarization.
    PRIOR = ((0.14, 0.21, 0.33, 0.33), (0.30, 0.57, 0.74, 0.83))
    UNANIMOUS_SHARE = (0.38, 0.77, 0.91, 0.91)  # of the copies after each length, the same data

    def __init__(self, strength: float = 4.0):
        self.strength = strength
        self.reset()

    def reset(self) -> None:
        self.judged = np.zeros((2, len(self.UNANIMOUS_SHARE)))
        self.accepted = np.zeros_like(self.judged)
        self._update()  # nothing judged: the priors

    def new_sequence(self) -> None:
        self.judged *= 0.5
        self.accepted *= 0.5
        self._update()

    def _bin(self, length: int) -> int:
        return min(max(length, 1), len(self.UNANIMOUS_SHARE)) - 1

    def chance(self, length: int, unanimous: bool) -> float:
        """The chance of a copy continuing a `length`-token match, its followers known."""
        return float(self._chances[int(unanimous), self._bin(length)])

    def chances(self, match: CopyMatch, count: int) -> np.ndarray:
        """The chance of each of `count` copies continuing `match`, the ones before it accepted:
        the first's followers are known, the later ones' not yet."""
        lengths = np.arange(match.length, match.length + count)
        out = self._mixed[np.clip(lengths, 1, len(self.UNANIMOUS_SHARE)) - 1]
        if count:
            out[0] = self.chance(match.length, match.unanimous)
        return out

    def observe(self, match: int, unanimous: list[bool], accepted: int) -> None:
        """A copy step's judged tokens: of the copies continuing a `match`-token match (`unanimous`:
        each verified copy's followers), the first `accepted` were accepted; copies after the first
        rejection were never judged."""
        for i, agreed in enumerate(unanimous[: accepted + 1]):
            self.judged[int(agreed), self._bin(match + i)] += 1.0
            self.accepted[int(agreed), self._bin(match + i)] += float(i < accepted)
        if unanimous:
            self._update()

    def _update(self) -> None:
        m, prior = self.strength, np.asarray(self.PRIOR)
        overall = (self.accepted.sum() + m) / ((self.judged * prior).sum() + m)
        self._chances = np.minimum((self.accepted + m * overall * prior) / (self.judged + m), 0.999)
        # A copy whose followers are not known yet: its length's mix of split and unanimous.
        share = np.asarray(self.UNANIMOUS_SHARE)
        self._mixed = share * self._chances[1] + (1.0 - share) * self._chances[0]


class RateTracker:
    """λ: tokens per modelled second over the sequence so far, starting from `initial` with the
    weight of `pseudo_steps` steps of the target alone."""

    def __init__(self, pseudo_steps: float = 4.0):
        self.pseudo_steps = pseudo_steps
        self.start(1.0, 1.0)

    def start(self, initial: float, target_step_s: float) -> None:
        self._time = self.pseudo_steps * target_step_s
        self._tokens = initial * self._time

    @property
    def rate(self) -> float:
        return self._tokens / self._time

    def observe(self, tokens: int, seconds: float) -> None:
        self._tokens += tokens
        self._time += seconds


def derive_rate(acceptance: float, cost: CostModel, t_verify: np.ndarray | None = None) -> float:
    """λ from a cost curve and an acceptance rate: the best tokens/s over chains of γ tokens
    accepted each with probability `acceptance`, (1 + Σ_{m≤γ} a^m) / (γ·t_draft + t_verify(γ+1)
    + t_step); γ = 0 is the target alone. The rate a controller should beat from the first step."""
    curve = np.asarray(cost.t_verify_s if t_verify is None else t_verify, float)
    gammas = np.arange(len(curve))
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(acceptance ** gammas[1:])])
    return float(np.max(expected / (gammas * cost.t_draft_s + curve + cost.t_step_s)))


class SignalSpread:
    """How much a step's first drafted token tells beyond the context: the last `size` shifts of
    its calibrated acceptance (from its own entropy and confidence) from the context-only prior,
    in log-odds (a sure token lifts a poor prior as far as a good one).

    Where the context alone says drafting does not pay, the first token's signals may still say it
    does (the draft is sure of it), and a draft token costs a fraction of a target pass. A peek
    drafts that token, then drafts on or drops it as its signals say. `peek_gain` prices that
    option over the observed spread; kept across sequences, since the spread is the drafter's."""

    MIN_SAMPLES = 8

    def __init__(self, size: int = 64):
        self.shifts: deque[float] = deque(maxlen=size)

    def observe(self, first_token: float, prior: float) -> None:
        self.shifts.append(_logit(first_token) - _logit(prior))

    def peek_gain(self, prior: float, gains: np.ndarray, charges: np.ndarray, draft_charge: float) -> float:
        """Expected tokens a peek adds over not drafting, net of its cost, in λ-units. `gains[k]` =
        Σ_{m≤k} prior^m, `charges[γ]` = λ·(time of a γ-token step), `draft_charge` = λ·t_draft.
        For a first token accepted with a₁ (the prior shifted as one of the spread), drafting on to
        γ adds a₁·(1 + gains[γ−1]) expected tokens for charges[γ] − charges[0], the first token's
        drafting already paid; a look that says no drafting pays drops the token (worth 0). Mean
        over the spread, less the look's own cost. −inf while fewer than `MIN_SAMPLES` are seen."""
        if len(self.shifts) < self.MIN_SAMPLES:
            return -math.inf
        odds = math.exp(_logit(prior)) * np.exp(np.asarray(self.shifts))
        first = np.minimum(odds / (1.0 + odds), 0.999)[:, None]
        extra = charges[1:] - charges[0] - draft_charge
        value = first * (1.0 + gains[None, :-1]) - extra[None, :]
        return float(np.maximum(value.max(axis=1), 0.0).mean() - draft_charge)


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 0.999)
    return math.log(p / (1.0 - p))
