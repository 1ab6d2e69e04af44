"""What decoding produces: per-token draft signals, step records and generation results.

Plain data, importing nothing of SpecKV's, so that controllers, the offline pipeline and reports
can all read them without depending on the decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class TokenSignals:
    """Signals of one drafted token; `position` counts from 1 within its step."""

    position: int
    entropy: float  # bits, of the draft's next-token distribution
    confidence: float  # the distribution's largest probability
    token_prob: float  # probability of the token actually proposed
    parent: int | None = None  # proposal index of the node it follows (-1: the root; None: a chain)
    free: bool = False  # copied (n-gram), not drafted: it cost no draft pass


@dataclass(frozen=True, slots=True)
class CopyMatch:
    """What a drafter could copy before a step (n-gram candidates): the sequence's last `length`
    tokens occurred earlier (0: nothing to copy), and `unanimous`: every earlier occurrence was
    followed by the same token, the one the first copy proposes. A unanimous match's copies are
    accepted about twice as often (`speckv.controllers.live.CopyChances`)."""

    length: int = 0
    unanimous: bool = False


def unanimous(confidence: float) -> bool:
    """Whether a copied token's signals say every earlier occurrence of its match was followed by
    it: its confidence (the largest share of the followers' counts) is 1."""
    return confidence >= 1.0 - 1e-9


@dataclass
class StepRecord:
    """One verification step. `gamma` counts the drafted tokens (tree nodes) the target verified;
    `drafted` all tokens drafted (≤ the budget; more than gamma when the controller verified only a
    prefix); `accepted` the length of the accepted path."""

    step: int
    gamma_budget: int
    gamma: int
    accepted: int
    tokens_produced: int  # tokens emitted: accepted + 1, fewer when EOS or the length limit cut in
    draft_entropy: list[float] = field(default_factory=list)
    draft_confidence: list[float] = field(default_factory=list)
    draft_token_prob: list[float] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    controller_time_s: float = 0.0
    drafted: int = 0
    copied: int = 0  # drafted tokens that were copies (n-gram): no draft pass ran for them
    # Tokens the draft model read before its first drafted token (0: it did not run): 1 or 2 after
    # its own step, the prompt at its first pass, more after steps it sat out (`Drafter.unread`).
    draft_read: int = 0
    depth: int = 0  # longest root path of the verified tree (= gamma for a chain)
    # Parent of each drafted node in proposal order (-1: the root), all drafted ones until
    # verification, then the verified ones; i - 1 for node i of a chain.
    parents: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    steps: list[StepRecord]
    total_time_s: float
    stop_reason: str  # "eos" or "length"
    # Seconds to the first step's tokens: reading the prompt (prefill) dominates it, so decode
    # speed is measured after it.
    first_token_s: float = 0.0

    def summary(self) -> dict:
        drafted = sum(s.gamma for s in self.steps)
        accepted = sum(s.accepted for s in self.steps)
        n_steps = len(self.steps)
        return {
            "new_tokens": len(self.token_ids),
            "steps": n_steps,
            "mean_gamma": drafted / n_steps if n_steps else 0.0,
            "mean_accepted": accepted / n_steps if n_steps else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_step": len(self.token_ids) / n_steps if n_steps else 0.0,
            "time_s": self.total_time_s,
            "tokens_per_s": len(self.token_ids) / self.total_time_s if self.total_time_s > 0 else 0.0,
            "time_to_first_token_s": self.first_token_s,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "stop_reason": self.stop_reason,
        }

    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first step (0 when nothing was decoded after it)."""
        later = len(self.token_ids) - (self.steps[0].tokens_produced if self.steps else 0)
        seconds = self.total_time_s - self.first_token_s
        return later / seconds if later > 0 and seconds > 0 else 0.0
