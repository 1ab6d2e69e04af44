"""SpecKV: the learned γ controller, in our form and in the paper's.

Ours (`speckv`) predicts, for each drafted token, the probability that the target accepts it given
that every earlier token of the step was accepted, from decision-time features only: the token's
own draft signals, what earlier steps of the sequence showed (`SequenceContext`) and the target's
compression level. After each drafted token it re-plans the step: with the acceptance of tokens
not yet drafted predicted from the context alone, it drafts on while some longer step has a
larger E[tokens](γ) − λ·time(γ), where E[tokens] = 1 + Σ_i Π_{j≤i} a_j, time(γ) = γ·t_draft +
t_verify(γ + 1) + t_step from the calibrated cost model, and λ the tokens per second the
controller achieves (fitted on training prompts): this maximises long-run tokens per second.
`speckv-step` makes the same choice once per step, before drafting (no per-token stop).

With a drafter that makes token trees (best first), and a controller file that holds a tree
model, `speckv` sizes trees instead: the tree model gives P(node accepted | its parent accepted)
from the sequence context and the node's own signals, so a node is reached with the product along its path. Drafting stops
at the first top-choice node whose reach does not pay for one more node, λ·(t_draft + the verify
pass's growth by a token): in best-first order later nodes are less probable. Then the controller
verifies the prefix of n nodes maximising 1 + Σ reach − λ·t_verify(n + 1) at the target's
compression level. Where verification is nearly flat in width (bf16 on a CPU with native bf16)
that keeps many nodes; where it is steep (fp32) few.
`speckv-paper` (`speckv.controllers.speckv_variants`) is the paper's objective: γ ∈ {2, 4, 6, 8} maximising predicted tokens per step,
clip(â)·γ + 1, with the paper's step-level predictor fed the previous step's signals (the
step's own signals, which the paper used, do not exist when γ is chosen).

Every model is a small MLP or linear layer run by `AcceptancePredictor.predict_fast` (numpy): a
decision takes microseconds. A controller file (JSON) holds the weights, feature names, the cost
models per compression level, and the versions it was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speckv.controllers.base import Controller, Drafts
from speckv.controllers.batch_budget import SharedPass, SharedVerifyBudget
from speckv.controllers.live import (
    CopyChances,
    LiveAcceptance,
    LiveCosts,
    RateTracker,
    SignalSpread,
    derive_rate,
)
from speckv.controllers.predictor import AcceptancePredictor
from speckv.controllers.sequence_context import CONTEXT_FEATURES, SequenceContext
from speckv.costs import CostModel, costs_from_dict, costs_to_dict
from speckv.errors import SpecKVError
from speckv.records import CopyMatch, unanimous
from speckv.util.files import atomic_write_text

FILE_FORMAT = "speckv-controller"
FILE_VERSION = 1
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "speckv-controller.json"

TOKEN_FEATURES = ("entropy", "confidence", "token_prob")
PAPER_CONTEXT = ("prev_mean_draft_entropy", "prev_mean_draft_confidence", "prev_max_draft_entropy")
PAPER_CONTEXT += ("prev_min_draft_confidence", "first_step")
NODE_FEATURES = (*TOKEN_FEATURES, "top_choice")


def compression_features(compressions) -> tuple[str, ...]:
    return tuple(f"comp_{c}" for c in compressions)


def context_features(compressions) -> tuple[str, ...]:
    return (*CONTEXT_FEATURES, *compression_features(compressions))


def token_features(compressions) -> tuple[str, ...]:
    return (*context_features(compressions), *TOKEN_FEATURES)


def paper_features(compressions) -> tuple[str, ...]:
    return (*PAPER_CONTEXT, *compression_features(compressions), "gamma")


def tree_features(compressions) -> tuple[str, ...]:
    return (*context_features(compressions), *NODE_FEATURES)


def top_choice(confidence, token_prob):
    """1 where the node is its parent's most probable child (its probability is the largest)."""
    return (np.asarray(token_prob) >= np.asarray(confidence) - 1e-6).astype(float)


@dataclass
class ControllerModels:
    """Everything a SpecKV controller file holds. Nothing in it is specific to one machine's speed
    but `costs`, the curves of the machine it was fitted on, stored as `fallback_costs`: used only
    where no curve of the machine it runs on is given (`--costs shipped`, or replay)."""

    compressions: tuple[str, ...]
    gamma_max: int
    token_model: AcceptancePredictor
    prior_model: AcceptancePredictor
    paper_model: AcceptancePredictor
    costs: dict[str, CostModel]
    context_decay: float = 0.3
    probe_every: int = 8  # after this many steps without drafting, draft one token to look again
    info: dict = field(default_factory=dict)
    tree_model: AcceptancePredictor | None = None  # P(node accepted | parent accepted); trees

    def to_dict(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "compressions": list(self.compressions),
            "gamma_max": self.gamma_max,
            "context_decay": self.context_decay,
            "token_model": self.token_model.to_dict(),
            "prior_model": self.prior_model.to_dict(),
            "paper_model": self.paper_model.to_dict(),
            "fallback_costs": costs_to_dict(self.costs),
            "probe_every": self.probe_every,
            "info": self.info,
            **({"tree_model": self.tree_model.to_dict()} if self.tree_model is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> ControllerModels:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SpecKVError(f"cannot read SpecKV controller {path}: {error}") from error
        if (
            not isinstance(document, dict)
            or document.get("format") != FILE_FORMAT
            or document.get("version") != FILE_VERSION
        ):
            raise SpecKVError(f"{path} is not a version-{FILE_VERSION} SpecKV controller file")
        try:
            models = cls(
                compressions=tuple(document["compressions"]),
                gamma_max=int(document["gamma_max"]),
                token_model=AcceptancePredictor.from_dict(document["token_model"], f"{path} token model"),
                prior_model=AcceptancePredictor.from_dict(document["prior_model"], f"{path} prior model"),
                paper_model=AcceptancePredictor.from_dict(document["paper_model"], f"{path} paper model"),
                # Files before version 0.2 call them `costs` (and carry rates λ, now derived live).
                costs=costs_from_dict(document.get("fallback_costs") or document["costs"], f"{path} costs"),
                context_decay=float(document["context_decay"]),
                probe_every=int(document.get("probe_every", 8)),
                info=document.get("info", {}),
                tree_model=AcceptancePredictor.from_dict(document["tree_model"], f"{path} tree model")
                if "tree_model" in document
                else None,
            )
            models._check()
        except SpecKVError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            what = (
                f"no '{error.args[0]}'" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            )
            raise SpecKVError(f"{path} is not a valid SpecKV controller file ({what})") from None
        return models

    def _check(self) -> None:
        """The shapes a controller relies on when it decides: one line if the file is inconsistent."""
        if not self.compressions or not all(isinstance(c, str) for c in self.compressions):
            raise ValueError("compressions must be a non-empty list of level names")
        if len(set(self.compressions)) != len(self.compressions):
            raise ValueError("compressions lists a level twice")
        if self.gamma_max < 1 or self.probe_every < 1 or not isinstance(self.info, dict):
            raise ValueError("gamma_max and probe_every must be ≥ 1 and info an object")
        expected = {
            "token model": (self.token_model, token_features(self.compressions)),
            "prior model": (self.prior_model, context_features(self.compressions)),
            "paper model": (self.paper_model, paper_features(self.compressions)),
        }
        if self.tree_model is not None:
            expected["tree model"] = (self.tree_model, tree_features(self.compressions))
        for name, (model, features) in expected.items():
            if tuple(model.feature_names) != features:
                raise ValueError(f"the {name} does not take the features {', '.join(features)}")
            if model.predict_fast(np.zeros(len(features))).shape != (1,):  # weights of the right shapes
                raise ValueError(f"the {name}'s layers do not give one output")
        missing = [c for c in self.compressions if c not in self.costs]
        if missing:
            raise ValueError(f"no cost model for {', '.join(missing)}")

    def one_hot(self, compression: str) -> list[float]:
        if compression not in self.compressions or compression not in self.costs:
            raise SpecKVError(
                f"this SpecKV controller knows compression levels {', '.join(self.compressions)}, "
                f"not {compression}; profile and train with it"
            )
        return [1.0 if c == compression else 0.0 for c in self.compressions]


def _clip01(value) -> float:
    return min(max(float(value), 0.0), 1.0)


class SpecKVController(Controller):
    """Ours: per-token re-planning (`per_token=True`, `speckv`) or one γ per step (`speckv-step`).

    Long-run tokens per second is a ratio of sums over steps; a policy maximises it when every
    step maximises E[tokens] − λ·time with λ the rate achieved (Dinkelbach). λ starts from the
    cost curve and the acceptance model (`live.derive_rate`) and follows the rate the controller
    achieves in the sequence; the cost curve is the one `costs` gives (measured on this machine,
    `speckv.decoding.local_costs`; else the file's fallback) and follows the measured step times
    unless `follow_costs` is off (exact replay of live runs); predicted acceptance is calibrated
    against what the sequence shows (`live.LiveAcceptance`). Copied tokens (n-gram candidates:
    `TokenSignals.free`) are charged no draft pass, and their chance comes from the length of the
    earlier match they continue and whether its followers agree (`live.CopyChances`), which the
    drafter tells before each step (`copies_ahead`): the step copies when the copies' best
    verified prefix is worth more than the model's best step, and says so to the drafter
    (`copies_chosen`).

    When no drafting pays (predicted), `begin_step` returns 0: the step is a plain target step,
    which the engine supports. Nothing is observed in such a step, so after `probe_every` of them
    in a row the controller drafts to look again (the length that loses least, all verified). Each
    probe doubles the wait (up to `PROBE_LIMIT`), each step that gets a drafted token accepted
    halves it, and a new sequence starts from half of it, so on text where drafting never pays
    probing costs ~1%. Copies passed over for plain steps are probed the same way (`_copy_budget`)."""

    PROBE_LIMIT = 64
    reads_copies = True

    def __init__(
        self,
        models: ControllerModels,
        compression: str,
        gamma_max: int,
        per_token: bool = True,
        costs: CostModel | None = None,
        follow_costs: bool = True,
    ):
        self.models = models
        self.per_token = per_token
        self.name = "speckv" if per_token else "speckv-step"
        self.compression = compression
        self.follow_costs = follow_costs
        self.cost_source = "given" if costs is not None else "fallback (the controller file's)"
        self._one_hot = models.one_hot(compression)
        self._gamma_cap = gamma_max
        self.context = SequenceContext(models.context_decay)
        self.acceptance = LiveAcceptance()  # of the draft model's tokens
        self.copy_chances = CopyChances()  # of copied (n-gram) tokens: another source
        self._copying = False  # this step's tokens are copied: no draft pass, their own chances
        self._probing = False  # this step is a probe: its token is verified whatever it looks like
        self._match = CopyMatch()  # the earlier match the drafter's copies would continue
        self._copy_match = 1  # the length of the match this step's copies continue
        self._model_drafts = True  # the drafter has a draft model (not copies only)
        self.rate = RateTracker()
        self.spread = SignalSpread()  # how far a first drafted token's signals move its acceptance
        self._prior = 0.0  # this step's calibrated context-only acceptance
        self._batch, self._batch_rate = 1, None  # sequences sharing the pass, their tokens/s
        self._shared = None  # the pass a batch shares (its times by width, the tick), if any
        self._n_context = len(CONTEXT_FEATURES) + len(self._one_hot)
        self._x = np.zeros(self._n_context + len(TOKEN_FEATURES))
        self._x[len(CONTEXT_FEATURES) : self._n_context] = self._one_hot
        self._node_x = np.zeros(len(tree_features(models.compressions)))
        self._node_x[len(CONTEXT_FEATURES) : self._n_context] = self._one_hot
        self.drafts = Drafts.EITHER if per_token and models.tree_model is not None else Drafts.CHAINS
        self._branching = False  # the bound drafter makes trees (and a tree model is there)
        self._reached = 1.0  # P(all tokens drafted so far are accepted)
        self._reach = [1.0]  # the same after each drafted token (index i: after token i)
        self._raw: list[float] = []  # the token model's own prediction for each drafted token
        self._node_reach: list[float] = []
        self.costs = LiveCosts(costs or models.costs[compression])
        self.use_costs(self.costs.prior, self.cost_source)

    def use_costs(self, cost: CostModel, source: str = "given") -> None:
        """Plan with `cost` (e.g. the curve measured on this machine) from now on."""
        if cost.compression != self.compression:
            raise SpecKVError(f"a {cost.compression} cost model for a {self.compression} target")
        self.costs.use(cost)
        self.cost_source = source
        self.gamma_max = min(self._gamma_cap, self.models.gamma_max, cost.gamma_max)
        self.tree_max = min(self._gamma_cap, cost.gamma_max)
        self._powers = np.arange(1, self.gamma_max + 1)
        self._gains = np.zeros(self.gamma_max + 1)  # Σ_{m≤k} a^m for tokens not yet drafted
        self._idle, self._probe_gap = 0, self.models.probe_every  # steps without drafting; wait
        self._dropped, self._copy_gap = 0, self.models.probe_every  # copy steps verifying none; wait
        self.reset()

    def bind(self, drafter) -> None:
        self._branching = self.drafts is Drafts.EITHER and drafter is not None and drafter.branches
        # Copies only (n-gram): where they do not pay, there is no draft model to turn to.
        self._model_drafts = not getattr(drafter, "copies_only", False)

    def observe_batch(
        self, sequences: int, tokens_per_s: float | None = None, shared: SharedPass | None = None
    ) -> None:
        self._batch, self._batch_rate = max(1, sequences), tokens_per_s
        self._shared = shared if self._batch > 1 else None

    def batch_budget(self) -> SharedVerifyBudget:
        return SharedVerifyBudget(self.costs.prior)

    def step_reach(self, record) -> list[float] | None:
        if self._branching or self._probing:  # trees size themselves; a probe's token is verified
            return None
        self._observe_record(record)
        return self._reach[1 : len(record.draft_confidence) + 1]

    def reset(self) -> None:
        self.context.reset()
        self.acceptance.new_sequence()
        self.copy_chances.new_sequence()
        # A new sequence of the stream starts its probing halfway back (as calibration keeps half
        # its evidence): text like the last is the best guess, and fresh probes cost.
        self._idle = self._dropped = 0
        self._probe_gap = max(self.models.probe_every, self._probe_gap // 2)
        self._copy_gap = max(self.models.probe_every, self._copy_gap // 2)
        self._x[: len(CONTEXT_FEATURES)] = self.context.values
        prior = _clip01(self.models.prior_model.predict_fast(self._x[: self._n_context])[0])
        curve = self.costs.t_verify()
        self.rate.start(derive_rate(prior, self.costs.prior, curve), curve[0] + self.costs.prior.t_step_s)

    def _plan(self) -> None:
        """λ times what steps cost now, on the curve as measured, dips included: where a wider pass
        costs less than a narrower one (GEMM kernels switch with the shape; on an AVX-512 EPYC at
        fp32, 5 tokens cost 82 ms and 3 cost 119), every plan looks ahead over all wider steps, so
        it drafts on to the cheaper width and verifies that (what the curve's monotone envelope
        promises, paying the extra drafted tokens' cost, which the envelope leaves out)."""
        # In a batch, a step's time delays every sequence of the pass: the tokens it must yield
        # are the batch's rate's worth (measured; until then about `_batch` times this one's).
        rate = self.rate.rate
        if self._batch > 1:
            rate = self._batch_rate or rate * self._batch
        t_draft = self.costs.t_draft_s
        curve = self.costs.t_verify()
        if self._shared is not None:  # what widening the batch's shared pass costs
            curve = np.asarray(self._shared.pass_times[: len(curve)], float)
        gammas = np.arange(self.gamma_max + 1)
        self._draft_charge = rate * t_draft
        self._step_charge = rate * self.costs.prior.t_step_s
        # λ·step time: the tokens a step of each length must yield to pay for its time
        self._charges = rate * (gammas * t_draft + curve[: self.gamma_max + 1] + self.costs.prior.t_step_s)
        # λ·target pass over k = 1.. tokens: what verifying a prefix costs once drafted
        self._verify_charges = rate * curve
        # trees: index i is λ·(one more node's drafting + the pass's growth from i + 1 to i + 2 tokens)
        self._tree_steps = rate * (t_draft + np.diff(curve))

    def copies_ahead(self, match: CopyMatch) -> None:
        self._match = match

    def copies_chosen(self) -> bool | None:
        # Per step only where it re-plans per token: `speckv-step` leaves it to the drafter.
        return self._copying if self.per_token and not self._branching else None

    def begin_step(self) -> int:
        x = self._x
        x[: len(CONTEXT_FEATURES)] = self.context.values
        self._node_x[: len(CONTEXT_FEATURES)] = self.context.values
        prior = self.acceptance.correct(self.models.prior_model.predict_fast(x[: self._n_context])[0])
        self._prior = prior
        self._plan()
        self._gains[1:] = np.cumsum(prior**self._powers)
        self._reached = 1.0
        self._reach = [1.0]
        self._raw = []
        self._node_reach = []
        self._copying = False
        self._probing = False
        match, self._match = self._match, CopyMatch()  # told afresh before each step
        # Value of drafting γ tokens with the model: expected extra tokens − λ·step time.
        values = self._gains - self._charges
        best = int(np.argmax(values))
        if match.length and self.per_token and not self._branching:
            self._copy_match = match.length
            model_drafts = self._model_drafts and best > 0
            copies = self._copy_budget(match, values[best] if model_drafts else values[0], model_drafts)
            if copies:
                return copies
        if not self._model_drafts:
            return 0
        # The context says no; the first token's own signals may say yes, for a draft pass.
        peek = best == 0 and self.per_token and not self._branching
        if peek and self.spread.peek_gain(prior, self._gains, self._charges, self._draft_charge) > 0.0:
            self._idle += 1
            return self.gamma_max
        if best == 0:
            self._idle += 1
            # In a shared batch, sequences probe on the same ticks (every gap-th, gaps being powers
            # of 2), so one draft pass and one wider verification serve all their probes; and no
            # more often than every `batch size`-th tick, since each probe tick delays them all.
            due = self._idle >= self._probe_gap
            if self._shared is not None:
                due = self._shared.tick % max(self._probe_gap, 1 << (self._batch - 1).bit_length()) == 0
            if not due:
                return 0
            self._idle = 0
            self._probe_gap = min(2 * self._probe_gap, self.PROBE_LIMIT)  # halved by each success
            self._probing = True
            # The probe drafts the length that loses least (one token where widths cost alike; on
            # a curve where 2 tokens cost more than 5, four), all verified whatever they look like
            # (else nothing is learnt): it shows more tokens for less than a single-token probe.
            return 1 + int(np.argmax(self._gains[1:] - self._charges[1:]))
        self._idle = 0
        if self._branching:
            return self.tree_max
        return self.gamma_max if self.per_token else best

    def continue_drafting(self, signals) -> bool:
        if self._branching:
            return self._tree_goes_on(signals)
        if not self.per_token:
            return True
        i = signals.position
        if i == 1 and signals.free != self._copying:  # a drafter that picked its source itself
            self._copying, self._copy_match = signals.free, 1  # a match not told: the shortest
        self._observe(signals.entropy, signals.confidence, signals.token_prob)
        if self._probing or self._copying:  # the length was chosen in begin_step
            return True
        if i >= self.gamma_max:
            return False
        # Drafting k more tokens adds reached·Σ_{m≤k} a^m expected tokens for λ·(k·t_draft +
        # t_verify(i+k+1)); it must beat the best step verifying what is drafted now (a prefix of
        # it, or none: on a curve with dips, going on to a cheaper width only to drop it all wastes
        # the drafting).
        expected = np.cumsum(self._reach)  # verifying j = 0..i drafted tokens
        now = float(np.max(expected - self._verify_charges[: i + 1]))
        more = self._powers[: self.gamma_max - i]  # 1, 2, … tokens more
        gains = self._reached * self._gains[more]
        later = expected[i] + gains - self._verify_charges[i + more] - self._draft_charge * more
        return float(later.max()) > now

    def verify_count(self, record) -> int:
        """The prefix j maximising E[tokens] − λ·t_verify(j + 1); the drafting is already paid.
        A wider pass that costs less wins by itself."""
        if self._branching:
            return self._tree_count(record)
        self._observe_record(record)
        if self._probing or self._shared is not None:  # the batch shares its pass out itself
            return len(record.draft_confidence)
        expected = np.cumsum(self._reach)  # E[tokens] when verifying j = 0, 1, …: 1 + Σ_{i≤j} reach_i
        return int(np.argmax(expected - self._verify_charges[: len(self._reach)]))

    def _copy_budget(self, match: CopyMatch, alternative: float, model_drafts: bool) -> int:
        """How many copies of `match` this step takes (0: none). Copies cost no draft pass, so the
        step copies when the best prefix to verify, at the copies' chances as known before they
        are drafted (`CopyChances.chances`), is worth more than `alternative` (the model's best
        step where `model_drafts`, else the plain step's), and takes that prefix. Copies passed over for a plain step are never judged, and
        nothing else is, so their chances could not recover from a bad stretch: after `_copy_gap`
        such steps in a row, one takes them anyway, as many as lose least; the wait doubles with
        each such probe and halves when a copy is accepted, as the model's probing does. (Copies
        passed over for the model's tokens need no probe: on the dev split, probing them there
        cost 3 % on code at fp32 for 1 token accepted in 33 verified.)"""
        reach = np.cumprod(self.copy_chances.chances(match, self.gamma_max))  # P(first i accepted)
        gains = np.concatenate([[0.0], np.cumsum(reach)])  # expected copies accepted, verifying j = 0..γ_max
        values = gains - self._verify_charges[: self.gamma_max + 1] - self._step_charge
        best = int(np.argmax(values))
        if best and values[best] >= alternative:
            self._dropped, self._copying = 0, True
            return best
        if model_drafts:
            return 0
        self._dropped += 1
        if self._dropped < self._copy_gap:
            return 0
        self._dropped = 0
        self._copy_gap = min(2 * self._copy_gap, self.PROBE_LIMIT)
        self._copying = self._probing = True
        return 1 + int(np.argmax(values[1:]))

    def _observe_record(self, record) -> None:
        for i in range(len(self._reach) - 1, len(record.draft_confidence)):  # tokens not seen yet
            self._observe(record.draft_entropy[i], record.draft_confidence[i], record.draft_token_prob[i])

    def _observe(self, entropy: float, confidence: float, token_prob: float) -> None:
        """P(this drafted token is accepted | the ones before it are), from the token model,
        calibrated on the sequence so far."""
        if self._copying:  # a copy's chance: its match's length and followers (`CopyChances`)
            length = self._copy_match + len(self._reach) - 1
            self._reached *= self.copy_chances.chance(length, unanimous(confidence))
            self._reach.append(self._reached)
            return
        x = self._x  # its context part was set by begin_step
        x[self._n_context :] = (entropy, confidence, token_prob)
        raw = float(self.models.token_model.predict_fast(x)[0])
        self._raw.append(raw)
        self._reached *= self.acceptance.correct(raw)
        if len(self._reach) == 1:
            self.spread.observe(self._reached, self._prior)
        self._reach.append(self._reached)

    def _tree_goes_on(self, signals) -> bool:
        i = signals.position
        parent = i - 2 if signals.parent is None else signals.parent
        self._observe_nodes([signals.entropy], [signals.confidence], [signals.token_prob], [parent])
        if i >= self.tree_max:
            return False
        # A side node's low reach says nothing of the main path still to come; a top choice that
        # does not pay means the best paths have run out (later nodes are less probable).
        side = top_choice(signals.confidence, signals.token_prob) == 0
        return bool(side or self._node_reach[-1] > self._tree_steps[i])

    def _observe_nodes(self, entropy, confidence, token_prob, parents) -> None:
        """Append the reach of these nodes: the tree model's P(node accepted | parent accepted)
        times the parent's reach."""
        rows = np.repeat(self._node_x[None], len(entropy), axis=0)
        rows[:, -len(NODE_FEATURES) :] = np.column_stack(
            [entropy, confidence, token_prob, top_choice(confidence, token_prob)]
        )
        chance = self.acceptance.correct_many(self.models.tree_model.predict_fast(rows))
        reach = self._node_reach
        for c, parent in zip(chance.tolist(), parents, strict=True):
            reach.append(c * (1.0 if parent < 0 else reach[parent]))

    def _tree_count(self, record) -> int:
        """The best-first prefix of n nodes maximising 1 + Σ reach − λ·t_verify(n + 1), where a
        node's reach is the product of the tree model's P(accepted | parent accepted) along its path."""
        n = min(len(record.draft_confidence), self.tree_max)
        if n == 0:
            return 0
        seen = len(self._node_reach)  # nodes observed while drafting; the rest read from the record
        if seen < n:
            self._observe_nodes(
                record.draft_entropy[seen:n],
                record.draft_confidence[seen:n],
                record.draft_token_prob[seen:n],
                record.parents[seen:n],
            )
        value = np.concatenate([[0.0], np.cumsum(self._node_reach[:n])]) - self._verify_charges[: n + 1]
        return int(np.argmax(value))

    def end_step(self, record) -> None:
        self.context.update(record)
        if record.accepted:  # the source found tokens: look again sooner
            if self._copying:
                self._copy_gap = max(self.models.probe_every, self._copy_gap // 2)
            else:
                self._probe_gap = max(self.models.probe_every, self._probe_gap // 2)
        if record.gamma and not self._branching:  # a chain: its judged tokens calibrate the model
            self._observe_record(record)
            if self._copying:
                verified = record.draft_confidence[: record.gamma]
                self.copy_chances.observe(self._copy_match, list(map(unanimous, verified)), record.accepted)
            else:
                self.acceptance.observe(self._raw[: record.gamma], record.accepted)
        if self.follow_costs:
            # In a batch the pass's time is the batch's (`batch_budget` follows it): only the
            # drafting says something of this sequence's costs.
            self.costs.observe(record, verify=self._batch == 1)
        self.rate.observe(record.tokens_produced, self.costs.step_time(record, self._copying))


def shipped_levels() -> tuple[str, ...]:
    """Compression levels the shipped controller (demo pair) was trained for; () when none ships."""
    try:
        return ControllerModels.load(SHIPPED).compressions
    except SpecKVError:
        return ()
