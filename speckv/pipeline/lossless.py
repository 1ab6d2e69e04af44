"""Checking that speculative decoding is lossless at a reduced precision.

In exact arithmetic greedy speculative decoding emits the target's own tokens. In bf16 or fp16 the
verify pass scores k tokens in one forward while target-only decoding scores one at a time; the
kernels round differently, so where the target's two best tokens are within the dtype's rounding
(a near-tie) the two runs may pick different ones. From there both continuations are valid greedy
decodings of the target, just different ones (docs/engine.md, "What is guaranteed").

`check_prompt` decodes a prompt target-only and speculatively, then replays the speculative
tokens through the target one token at a time (cached, exactly as target-only decoding computes
them) and reports every position where the emitted token is not the target's argmax, with the
logit margin and the tolerance of `near_tie_tolerance`. A divergence wider than the tolerance is a
bug in the decoder, not rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from speckv.decoding.builder import DecoderFactory
from speckv.decoding.cache import CachedModel
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel

# Units in the last place of the top logit's magnitude within which two passes may order the top
# two tokens differently; see `near_tie_tolerance`.
NEAR_TIE_ULPS = 8


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Spacing of `dtype` numbers at |magnitude|: 2^(floor(log2|x|) − p) with p the stored mantissa
    bits (bf16 7, fp16 10, fp32 23), i.e. eps · 2^floor(log2|x|); subnormals keep the smallest
    normal spacing."""
    info = torch.finfo(dtype)
    magnitude = max(abs(float(magnitude)), info.tiny)
    return info.eps * 2.0 ** math.floor(math.log2(magnitude))


def near_tie_tolerance(dtype: torch.dtype, magnitude: float) -> float:
    """The largest top-2 logit margin that a k-token and a 1-token pass may order differently.

    For the argmax to flip, the margin m = l₁ − l₂ must change sign between the passes, so
    |m| ≤ |δl₁| + |δl₂| (δl: a logit's difference between the passes). Each logit differs by up
    to 1 ulp from rounding its own output (½ ulp per pass), plus what the head's input brings:
    the residual stream is rounded after every layer, differently in each pass, and those
    differences add up over the depth (a random walk of single roundings). On the demo target
    (30 layers, bf16) flips were seen up to a margin of 4 ulp, i.e. |δl| ≈ 2 ulp; the tolerance
    doubles that for headroom: 2 logits × (1 + 3) ulp = `NEAR_TIE_ULPS` = 8 ulp of the top logit
    in the body's compute dtype, e.g. bf16 at |logit| 20: 8 · 2^(4−7) = 1.0. A broken verifier
    leaves the argmax by whole logits, far above it."""
    return NEAR_TIE_ULPS * ulp(dtype, magnitude)


@dataclass
class Divergence:
    """A position where the speculative run emitted a token that is not the target's argmax."""

    position: int  # index among the new tokens
    emitted: int
    expected: int  # the target's argmax there (1-token sequential forward)
    margin: float  # logit(expected) − logit(emitted) ≥ 0
    magnitude: float  # |logit(expected)|
    tolerance: float

    @property
    def near_tie(self) -> bool:
        return self.margin <= self.tolerance


@dataclass
class PromptCheck:
    """One prompt: the target-only and speculative outputs and every divergence of the latter."""

    prompt_id: str
    target_only: list[int]
    speculative: list[int]
    divergences: list[Divergence] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def first_difference(self) -> int | None:
        """First position where the two outputs differ (None: identical)."""
        for position, (a, b) in enumerate(zip(self.target_only, self.speculative, strict=False)):
            if a != b:
                return position
        same_length = len(self.target_only) == len(self.speculative)
        return None if same_length else min(len(self.target_only), len(self.speculative))

    @property
    def reproducible(self) -> bool:
        """The replay found its first divergence where the two runs first differ: target-only
        decoding gave the same logits twice (False means the checker cannot judge this prompt)."""
        first = self.divergences[0].position if self.divergences else None
        return first == self.first_difference

    @property
    def lossless(self) -> bool:
        return self.reproducible and all(d.near_tie for d in self.divergences)

    def to_dict(self) -> dict:
        return {
            "id": self.prompt_id,
            "dtype": self.dtype,
            "new_tokens": len(self.speculative),
            "first_difference": self.first_difference,
            "reproducible": self.reproducible,
            "lossless": self.lossless,
            "divergences": [asdict(d) | {"near_tie": d.near_tie} for d in self.divergences],
        }


def replay_divergences(
    target: LoadedModel, prompt_ids: list[int], tokens: list[int], dtype: torch.dtype | None = None
) -> list[Divergence]:
    """Feed `tokens` after the prompt one at a time through the target (prompt in one pass, then
    one token per forward: target-only decoding's own computation) and list every position where
    the token is not the target's argmax, with its margin and near-tie tolerance."""
    dtype = dtype or target.compute_dtype
    model = CachedModel(target)
    found = []
    logits = model.feed(list(prompt_ids), keep=1).logits[0, -1]
    for position, token in enumerate(tokens):
        expected = int(logits.argmax())
        if expected != token:
            best, emitted = float(logits[expected]), float(logits[token])
            found.append(
                Divergence(
                    position,
                    token,
                    expected,
                    best - emitted,
                    abs(best),
                    near_tie_tolerance(dtype, best),
                )
            )
        if position + 1 < len(tokens):
            logits = model.feed([token], keep=1).logits[0, -1]
    return found


def check_prompt(
    decoders: DecoderFactory,
    prompt_ids: list[int],
    max_new_tokens: int,
    prompt_id: str = "prompt",
    speculative: list[int] | None = None,
) -> PromptCheck:
    """Greedy target-only vs speculative decoding of one prompt (a fresh decoder of `decoders`,
    unless `speculative` gives its output, e.g. decoded in a batch), and the latter's divergences."""
    target = decoders.target
    target_only = SpeculativeDecoder(target).generate(prompt_ids, max_new_tokens).token_ids
    if speculative is None:
        speculative = decoders.new().generate(prompt_ids, max_new_tokens).token_ids
    dtype = target.compute_dtype
    divergences = replay_divergences(target, prompt_ids, speculative, dtype)
    return PromptCheck(prompt_id, target_only, speculative, divergences, str(dtype).removeprefix("torch."))


def describe(check: PromptCheck) -> str:
    """One line for a prompt: identical, or where it differs and each divergence's margin."""
    first = check.first_difference
    if first is None and not check.divergences:
        return f"{check.prompt_id}: {len(check.speculative)} tokens, identical to target-only"
    parts = [
        f"token {d.position}: margin {d.margin:.4g} {'≤' if d.near_tie else '>'} tolerance "
        f"{d.tolerance:.4g} (|logit| {d.magnitude:.3g}, {'near-tie' if d.near_tie else 'NOT a near-tie'})"
        for d in check.divergences
    ]
    line = (
        f"{check.prompt_id}: differs from target-only at token {first}; "
        f"{len(check.divergences)} divergence(s): " + "; ".join(parts)
    )
    if not check.reproducible:
        line += " — target-only decoding did not reproduce its own logits (nondeterministic kernels?)"
    return line


def failures(checks: list[PromptCheck]) -> list[str]:
    """One line per prompt that is not lossless, naming the prompt and the position."""
    lines = []
    for check in checks:
        if not check.reproducible:
            lines.append(
                f"{check.prompt_id}: target-only decoding is not reproducible (token {check.first_difference})"
            )
        for d in check.divergences:
            if not d.near_tie:
                lines.append(
                    f"{check.prompt_id} token {d.position}: emitted {d.emitted}, target's argmax {d.expected}, "
                    f"margin {d.margin:.4g} > tolerance {d.tolerance:.4g}"
                )
    return lines


def summary(checks: list[PromptCheck], precision: str) -> str:
    """The closing line: how many outputs differ, how many divergences, whether all are near-ties."""
    differ = sum(c.first_difference is not None for c in checks)
    divergences = [d for c in checks for d in c.divergences]
    ties = sum(d.near_tie for d in divergences)
    verdict = "lossless within rounding" if all(c.lossless for c in checks) else "NOT lossless"
    return (
        f"{len(checks)} prompts at {precision}: {differ} differ from target-only; {len(divergences)} "
        f"divergence(s), {ties} near-tie(s) (tolerance {NEAR_TIE_ULPS} ulp of the top logit) → {verdict}"
    )
