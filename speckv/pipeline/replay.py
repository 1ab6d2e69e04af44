"""Exact offline replay of γ policies on recorded greedy traces, and the oracle bound (design §4).

Greedy speculative decoding emits the target's own greedy continuation y whatever the policy, so
one recording per prompt scores every policy exactly. A `Trace` holds y, the draft's teacher-forced
prediction at every position (its token and signals), and, at every position where that
prediction is wrong, the draft's free-running continuation after its wrong token. A step starting
at t whose draft matches y for L(t) consecutive tokens accepts min(L(t), γ) of γ drafted tokens;
the signals of drafted tokens 1..L(t)+1 are the teacher-forced ones, later ones the free-running
ones. That holds for a draft model, whose chain from t is its teacher-forced predictions while
they match. A feature head's chain depends on where the step starts (it feeds its own states
after the target's last verified position), so its trace stores the whole chain a step starting
at each t drafts (`chains`), and L(t) is that chain's match with y. `replay` drives a real
`Controller` through exactly the calls the engine makes, so adaptive and stopping policies replay
exactly too, and charges each step the calibrated cost model.

N-gram copies need no recording: they are a function of the text, the prompt (which a trace
keeps, `prompt`) and y so far, so replay computes them as live. With `drafter="model+ngram"` it
runs the shipped default, the model's chain or the n-gram continuation per step
(`SwitchingChainDrafter`), and with `"ngram"` the copies alone; a copy costs no draft pass. Any
chain is accepted as far as it matches y.

`oracle` is the best γ per step in hindsight: every prompt yields the same tokens under every
policy, so the highest tokens/s is the lowest total time, a shortest path over positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from speckv.controllers import Controller, Drafts
from speckv.costs import CostModel
from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.drafters.hybrid import SwitchingChainDrafter
from speckv.decoding.drafters.ngram import NGramDrafter
from speckv.decoding.step import run_step
from speckv.decoding.tree import is_chain
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import CopyMatch, StepRecord

Signals = tuple[float, float, float]  # entropy (bits), confidence, token probability


@dataclass
class Trace:
    """The replay data of one prompt at one compression level (design §4).

    Position t is the t-th generated token: `tokens[t]` is the target's, `draft_tokens[t]` and
    `signals[t]` the draft's teacher-forced prediction for it. `free[t]`, only where the
    prediction is wrong, lists the draft's next tokens (token, signals) after its wrong token,
    up to gamma_max − 1 of them, cut after an end-of-sequence token.
    """

    prompt_id: str
    task: str
    compression: str
    prompt_len: int
    max_new_tokens: int
    gamma_max: int
    eos_ids: tuple[int, ...]
    tokens: list[int]
    draft_tokens: list[int]
    signals: list[Signals]
    free: dict[int, list[tuple[int, Signals]]] = field(default_factory=dict)
    pair: str = ""
    # The prompt's token ids, which n-gram copies match against (None: recorded without them).
    prompt: list[int] | None = None
    # Per position t, the chain (token, signals) a step starting at t drafts, up to gamma_max
    # tokens, cut after an end-of-sequence token (empty where the drafter drafts nothing); None
    # for drafters whose chain is their teacher-forced predictions (`free` then completes it).
    chains: list[list[tuple[int, Signals]]] | None = None

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.draft_tokens) != n or len(self.signals) != n:
            raise SpecKVError(f"trace {self.prompt_id}: tokens, draft tokens and signals differ in length")
        if self.prompt is not None and len(self.prompt) != self.prompt_len:
            raise SpecKVError(
                f"trace {self.prompt_id}: {len(self.prompt)} prompt tokens, prompt_len {self.prompt_len}"
            )
        if self.chains is None:
            self.run_length = run_lengths(np.asarray(self.tokens) == np.asarray(self.draft_tokens))
            return
        if len(self.chains) != n:
            raise SpecKVError(f"trace {self.prompt_id}: {len(self.chains)} chains for {n} positions")
        self.run_length = np.array(
            [
                _matched([token for token, _ in chain], self.tokens[t : t + len(chain)])
                for t, chain in enumerate(self.chains)
            ]
        )

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _matched(chain: list[int], following: list[int]) -> int:
    """How many leading tokens of `chain` equal `following`."""
    count = 0
    for token, expected in zip(chain, following, strict=False):
        if token != expected:
            break
        count += 1
    return count


def run_lengths(match: np.ndarray) -> np.ndarray:
    """L(t): how many consecutive positions from t on the draft predicts correctly."""
    lengths = np.zeros(len(match) + 1, dtype=np.int64)
    for t in range(len(match) - 1, -1, -1):
        lengths[t] = lengths[t + 1] + 1 if match[t] else 0
    return lengths[:-1]


@dataclass
class PolicyRun:
    """One policy on one trace: what it emitted, in how many steps, at what modelled cost."""

    tokens: int
    steps: int
    drafted: int  # drafted tokens sent to the target (StepRecord.gamma summed)
    accepted: int
    time_s: float
    gammas: list[int]
    records: list[StepRecord] = field(default_factory=list)


class TraceDrafter(Drafter):
    """The draft as recorded: teacher-forced predictions while its context is still the target's,
    the free-running continuation after its first wrong token. The context is the generated part."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.name = f"trace:{trace.prompt_id}"
        # What the draft model's cache would hold, as live (`ModelDrafter`): the prompt unread at
        # first, then the context it drafted after and every drafted token it was asked past.
        self._read = -trace.prompt_len

    def unread(self, context: list[int]) -> int:
        return len(context) - self._read

    def rollback(self, kept: int, verdict: Verdict) -> None:
        self._read = min(self._read, kept)

    def draft(self, context, budget, sampling, generator) -> Iterator[Proposal]:
        for position, proposal in enumerate(self._proposals(context, budget)):
            self._read = len(context) + position  # it reads a token to draft past it
            yield proposal

    def _proposals(self, context, budget) -> Iterator[Proposal]:
        trace, t = self.trace, len(context)
        if budget > trace.gamma_max:
            raise SpecKVError(
                f"a policy drafts {budget} tokens; the profile recorded at most "
                f"{trace.gamma_max} (profile with a larger --gamma-max)"
            )
        if trace.chains is not None:  # the recorded chain; shorter only where the drafter stopped
            for token, signals in trace.chains[t][:budget]:
                yield Proposal(token, *signals)
            return
        run = int(trace.run_length[t])
        for position in range(1, budget + 1):
            token, signals = _drafted_token(trace, t, run, position)
            yield Proposal(token, *signals)


class TraceCopies(Drafter):
    """N-gram copies in replay, where the context is the generated part alone: the n-gram drafter
    sees the prompt before it, as it does live."""

    copies_only = True

    def __init__(self, ngram: NGramDrafter, prompt: list[int]):
        self.ngram, self.prompt = ngram, list(prompt)
        self.name = ngram.name

    def draft(self, context, budget, sampling, generator) -> Iterator[Proposal]:
        yield from self.ngram.draft(self.prompt + context, budget, sampling, generator)

    def copy_match(self, context: list[int]) -> CopyMatch:
        return self.ngram.copy_match(self.prompt + context)


REPLAY_DRAFTERS = ("model", "model+ngram", "ngram")


def trace_drafter(trace: Trace, source: str = "model") -> Drafter:
    """The drafter a replay of `trace` runs: `model`, the recorded draft; `model+ngram`, per step
    its chain or the n-gram continuation (the shipped default, `SwitchingChainDrafter`); `ngram`,
    the copies alone (both with the default n-gram lengths, as `make_drafter` builds them)."""
    if source not in REPLAY_DRAFTERS:
        raise SpecKVError(f"replay drafter '{source}': choose one of {', '.join(REPLAY_DRAFTERS)}")
    model = TraceDrafter(trace)
    if source == "model":
        return model
    if trace.prompt is None:
        raise SpecKVError(f"trace {trace.prompt_id} was recorded without its prompt: n-gram copies need it")
    if source == "model+ngram" and trace.chains is not None:
        raise SpecKVError("n-gram copies switch with a draft model's chain, not a feature head's (as live)")
    # Replay is greedy: the vocabulary size serves only sampled copies.
    copies = TraceCopies(NGramDrafter(vocab_size=0), trace.prompt)
    return copies if source == "ngram" else SwitchingChainDrafter(model, copies)


class TraceVerifier:
    """The target as recorded: a step from t accepts the drafted tokens as far as they match y
    (min(L(t), verified) for the recorded draft), then the target's own."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def verify(self, context, drafted, parents, draft_probs, generator) -> Verdict:
        if not is_chain(parents):
            raise SpecKVError("replay scores chains: a trace records one draft continuation per position")
        t = len(context)
        tokens = self.trace.tokens
        accepted = _matched(drafted, tokens[t : t + len(drafted)])
        # Past the end the sequence stopped (EOS or length): any token will be cut.
        following = tokens[t + accepted] if t + accepted < len(tokens) else -1
        return Verdict(drafted[:accepted], following, path=list(range(accepted)))

    def rollback(self, kept: int) -> None:
        """Nothing to roll back: the trace is read-only."""


def replay(
    trace: Trace,
    controller: Controller,
    cost: CostModel | None = None,
    keep_records: bool = False,
    drafter: str = "model",
) -> PolicyRun:
    """Run `controller` on `trace` through the engine's own step (greedy) with the recorded draft,
    or n-gram copies beside or instead of it (`drafter`, see `trace_drafter`); time from `cost`
    (NaN without)."""
    if controller.drafts is Drafts.TREES:
        raise SpecKVError(
            f"{controller.describe()} budgets tree nodes; replay scores chains (evaluate trees live)"
        )
    source, verifier = trace_drafter(trace, drafter), TraceVerifier(trace)
    eos = frozenset(trace.eos_ids)
    greedy = SamplingConfig()
    n = trace.n_tokens
    controller.bind(source)  # as the engine does: it plans for the drafter it has
    controller.reset()
    context: list[int] = []
    step = verified_total = accepted_total = 0
    seconds = 0.0
    gammas, records = [], []
    while len(context) < n:
        record, new_tokens = run_step(
            step,
            context,
            trace.max_new_tokens - len(context) - 1,
            controller,
            source,
            verifier,
            greedy,
            eos,
            cost=cost,
            clock=_no_clock,
        )
        if cost is not None:
            seconds += record.draft_time_s + record.verify_time_s + cost.t_step_s
        context.extend(new_tokens[: n - len(context)])
        gammas.append(record.gamma)
        verified_total += record.gamma
        accepted_total += record.accepted
        if keep_records:
            records.append(record)
        step += 1
    if cost is None:
        seconds = float("nan")
    else:
        # The draft model reads the prompt at its first pass (`StepRecord.draft_read`), if any.
        seconds += cost.prefill_time(trace.prompt_len, speculative=False)
    return PolicyRun(n, step, verified_total, accepted_total, seconds, gammas, records)


def _drafted_token(trace: Trace, t: int, run: int, position: int) -> tuple[int, Signals]:
    """The draft's `position`-th token (from 1) of a step starting at t, and its signals."""
    if position <= run + 1:  # its context is still the target's: the teacher-forced prediction
        index = t + position - 1
        if index >= trace.n_tokens:
            raise SpecKVError(f"trace {trace.prompt_id} ends before position {index}")
        return trace.draft_tokens[index], trace.signals[index]
    continuation = trace.free.get(t + run, [])
    offset = position - run - 2
    if offset >= len(continuation):
        raise SpecKVError(f"trace {trace.prompt_id} has no free-running token {offset} at {t + run}")
    return continuation[offset]


def _no_clock() -> float:
    """Replay measures nothing: times come from the cost model."""
    return 0.0


def target_only(trace: Trace, cost: CostModel | None = None) -> PolicyRun:
    """Decoding with the target alone: one token per step, no draft, no draft prefill."""
    n = trace.n_tokens
    seconds = float("nan")
    if cost is not None:
        seconds = n * cost.step_times()[0] + cost.prefill_time(trace.prompt_len, speculative=False)
    return PolicyRun(n, n, 0, 0, seconds, [0] * n)


def oracle(
    trace: Trace,
    step_times: Sequence[float] | np.ndarray,
    prefill_s: float = 0.0,
    copies: list[list[int]] | None = None,
    copy_times: Sequence[float] | np.ndarray | None = None,
    model: bool = True,
) -> PolicyRun:
    """The γ sequence minimising Σ step_times[γ] over the trace (best γ per step in hindsight).

    With step_times = ones this maximises tokens per step; with a cost model's step times it
    maximises tokens per second. T(t) = min over γ of step_times[γ] + T(t + produced(t, γ)), where
    produced = min(min(L(t), γ) + 1, N − t) and γ ≤ min(gamma_max, max_new_tokens − t − 1), the
    budgets the engine allows. Any policy's steps are among these choices, so none is faster.

    With `copies`, the n-gram continuation at every position (`copy_chains`), a step may instead
    verify its first γ copies, at `copy_times[γ]` (no draft pass), accepted as far as they match
    y; `model=False` leaves out the draft model's chains (the copies alone, or a plain step).
    """
    step_times = np.asarray(step_times, dtype=float)
    if copy_times is not None:
        copy_times = np.asarray(copy_times, dtype=float)
    n, tokens = trace.n_tokens, trace.tokens
    gamma_cap = min(trace.gamma_max, len(step_times) - 1) if model else 0
    best = np.zeros(n + 1)
    chosen = [(0, 0)] * n  # (γ, accepted) of the best step from t
    for t in range(n - 1, -1, -1):
        room = trace.max_new_tokens - t - 1
        gammas = np.arange(min(gamma_cap, room) + 1)
        accepted = np.minimum(trace.run_length[t], gammas)
        times = step_times[gammas]
        if copies is not None and copies[t] and room > 0:
            chain = copies[t][: min(room, len(copy_times) - 1)]
            copied = np.arange(1, len(chain) + 1)
            gammas = np.concatenate([gammas, copied])
            accepted = np.concatenate(
                [accepted, np.minimum(_matched(chain, tokens[t : t + len(chain)]), copied)]
            )
            times = np.concatenate([times, copy_times[copied]])
        totals = times + best[t + np.minimum(accepted + 1, n - t)]
        i = int(np.argmin(totals))
        chosen[t], best[t] = (int(gammas[i]), int(accepted[i])), totals[i]
    gammas, t, accepted = [], 0, 0
    while t < n:
        gamma, kept = chosen[t]
        gammas.append(gamma)
        accepted += kept
        t += min(kept + 1, n - t)
    return PolicyRun(n, len(gammas), sum(gammas), accepted, float(best[0]) + prefill_s, gammas)


def copy_chains(trace: Trace, cap: int) -> list[list[int]]:
    """At every position, the n-gram continuation a step starting there copies (at most `cap`
    tokens): what the replay drafter `ngram` proposes."""
    copies, greedy = trace_drafter(trace, "ngram"), SamplingConfig()
    return [
        [p.token for p in copies.draft(trace.tokens[:t], cap, greedy, None)] for t in range(trace.n_tokens)
    ]


def cost_oracle(trace: Trace, cost: CostModel, drafter: str = "model") -> PolicyRun:
    """The oracle for modelled tokens/s, prefill included, with the steps `drafter` offers (see
    `trace_drafter`); it may also leave the draft model out altogether (the target alone, or
    copies alone, do not pay the draft's prefill). Where the model drafts, its reading is charged
    as the least any policy pays: the prompt alone, at step 0, and never a catch-up on tokens it
    sat out (`StepRecord.draft_read`), so no policy is faster."""
    if drafter not in REPLAY_DRAFTERS:
        raise SpecKVError(f"replay drafter '{drafter}': choose one of {', '.join(REPLAY_DRAFTERS)}")
    model = drafter != "ngram"
    target_prefill = cost.prefill_time(trace.prompt_len, speculative=False)
    prefill = target_prefill + (cost.read_time(trace.prompt_len) if model else 0.0)
    candidates = [target_only(trace, cost)]
    if drafter == "model":
        candidates.append(oracle(trace, cost.step_times(), prefill))
    else:
        copy_times = np.asarray(cost.t_verify_s) + cost.t_step_s
        copies = copy_chains(trace, len(copy_times) - 1)
        candidates.append(oracle(trace, cost.step_times(), prefill, copies, copy_times, model))
        if model:  # copies alone never run the draft model, nor pay its prefill
            candidates.append(
                oracle(trace, cost.step_times(), target_prefill, copies, copy_times, model=False)
            )
    return min(candidates, key=lambda run: run.time_s)


# --- storage: one row per generated position --------------------------------------------------

TRACE_COLUMNS = (
    "pair",
    "compression",
    "task",
    "prompt_id",
    "prompt_len",
    "max_new_tokens",
    "gamma_max",
    "eos_ids",
    "position",
    "token",
    "draft_token",
    "match",
    "entropy",
    "confidence",
    "token_prob",
    "free_tokens",
    "free_entropy",
    "free_confidence",
    "free_token_prob",
)
# Stored only for traces that keep their prompt (on every row, as the other per-trace values are).
PROMPT_COLUMN = "prompt_tokens"
# Stored only for traces with per-start chains (feature heads).
CHAIN_COLUMNS = ("chain_tokens", "chain_entropy", "chain_confidence", "chain_token_prob")


def trace_to_frame(trace: Trace) -> pd.DataFrame:
    """Per-position rows (the design's per-position signals), free continuations as list columns."""
    n = trace.n_tokens
    signals = np.asarray(trace.signals, dtype=float).reshape(n, 3)
    free = [trace.free.get(t, []) for t in range(n)]
    frame = pd.DataFrame(
        {
            "pair": trace.pair,
            "compression": trace.compression,
            "task": trace.task,
            "prompt_id": trace.prompt_id,
            "prompt_len": trace.prompt_len,
            "max_new_tokens": trace.max_new_tokens,
            "gamma_max": trace.gamma_max,
            "eos_ids": [list(trace.eos_ids)] * n,
            "position": np.arange(n),
            "token": trace.tokens,
            "draft_token": trace.draft_tokens,
            "match": np.asarray(trace.tokens) == np.asarray(trace.draft_tokens),
            "entropy": signals[:, 0],
            "confidence": signals[:, 1],
            "token_prob": signals[:, 2],
            "free_tokens": [[token for token, _ in items] for items in free],
            "free_entropy": [[s[0] for _, s in items] for items in free],
            "free_confidence": [[s[1] for _, s in items] for items in free],
            "free_token_prob": [[s[2] for _, s in items] for items in free],
        },
        columns=list(TRACE_COLUMNS),
    )
    if trace.prompt is not None:
        frame[PROMPT_COLUMN] = [list(trace.prompt)] * n
    if trace.chains is not None:
        for index, column in enumerate(CHAIN_COLUMNS):
            frame[column] = [
                [token if index == 0 else s[index - 1] for token, s in chain] for chain in trace.chains
            ]
    return frame


def traces_from_frame(frame: pd.DataFrame) -> list[Trace]:
    """The traces stored in per-position rows, one per (compression, prompt), in row order."""
    missing = [column for column in TRACE_COLUMNS if column not in frame.columns]
    if missing:
        raise SpecKVError(f"replay data lacks columns: {', '.join(missing)}")
    traces = []
    for _, rows in frame.groupby(["compression", "prompt_id"], sort=False):
        rows = rows.sort_values("position")
        first = rows.iloc[0]
        signals = list(zip(rows["entropy"], rows["confidence"], rows["token_prob"], strict=True))
        free = {}
        for position, tokens, entropy, confidence, prob in zip(
            rows["position"],
            rows["free_tokens"],
            rows["free_entropy"],
            rows["free_confidence"],
            rows["free_token_prob"],
            strict=True,
        ):
            if len(tokens):
                free[int(position)] = [
                    (int(token), (float(e), float(c), float(p)))
                    for token, e, c, p in zip(tokens, entropy, confidence, prob, strict=True)
                ]
        traces.append(
            Trace(
                prompt_id=str(first["prompt_id"]),
                task=str(first["task"]),
                compression=str(first["compression"]),
                prompt_len=int(first["prompt_len"]),
                max_new_tokens=int(first["max_new_tokens"]),
                gamma_max=int(first["gamma_max"]),
                eos_ids=tuple(int(i) for i in first["eos_ids"]),
                tokens=[int(x) for x in rows["token"]],
                draft_tokens=[int(x) for x in rows["draft_token"]],
                signals=[(float(e), float(c), float(p)) for e, c, p in signals],
                free=free,
                pair=str(first["pair"]),
                prompt=[int(x) for x in first[PROMPT_COLUMN]] if _has_lists(rows, PROMPT_COLUMN) else None,
                chains=_chains(rows) if _has_lists(rows, CHAIN_COLUMNS[0]) else None,
            )
        )
    return traces


def _has_lists(rows: pd.DataFrame, column: str) -> bool:
    """An optional column with a list in every row (a frame that also holds traces without it has NaN)."""
    return column in rows.columns and bool(
        rows[column].map(lambda value: isinstance(value, list | np.ndarray)).all()
    )


def _chains(rows: pd.DataFrame) -> list[list[tuple[int, Signals]]]:
    return [
        [(int(token), (float(e), float(c), float(p))) for token, e, c, p in zip(*columns, strict=True)]
        for columns in zip(*(rows[column] for column in CHAIN_COLUMNS), strict=True)
    ]
