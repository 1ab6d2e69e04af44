"""The speculative decoding loop (batch size 1).

Each step is `speckv.decoding.step.run_step`: the controller sets a drafting budget, the drafter
proposes tokens (asking the controller whether to go on), the target verifies them in one pass,
and both sides roll back to the kept sequence. Without a drafter each step is one plain target
decoding step, which makes the same loop the target-only baseline. The loop knows no specific
controller or drafter.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from speckv.controllers import Controller
from speckv.decoding.drafters import Drafter, model_drafter
from speckv.decoding.models import LoadedModel
from speckv.decoding.step import run_step
from speckv.decoding.target import TargetVerifier
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import GenerationResult, StepRecord


class SpeculativeDecoder:
    """Lossless speculative decoding of `target` with `draft` (a drafter, or a draft model);
    `draft=None` decodes the target alone. One sequence at a time: `stream` resets every state,
    so one decoder serves any number of sequences one after another."""

    def __init__(
        self,
        target: LoadedModel,
        draft: Drafter | LoadedModel | None = None,
        controller: Controller | None = None,
        sampling: SamplingConfig | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ):
        """`eos_token_ids` overrides the target's own stop tokens (an empty tuple: never stop early)."""
        if draft is not None and controller is None:
            raise SpecKVError("a draft model needs a controller (e.g. fixed:4)")
        sampling = sampling or SamplingConfig()
        sampling.check()
        if isinstance(draft, LoadedModel):
            draft = model_drafter(draft, target, controller.drafts)
        self.target, self.drafter, self.controller, self.sampling = target, draft, controller, sampling
        self.eos_ids = frozenset(target.eos_token_ids if eos_token_ids is None else eos_token_ids)
        hidden_layers = draft.target_hidden_layers if draft is not None else ()
        self.verifier = TargetVerifier(target, sampling, hidden_layers, self.eos_ids)
        if controller is not None:
            controller.bind(draft)
        self._streaming = False

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int = 128, min_new_tokens: int = 0
    ) -> GenerationResult:
        start = time.perf_counter()
        tokens: list[int] = []
        steps: list[StepRecord] = []
        first_token_s = 0.0
        for record, new_tokens in self.stream(prompt_ids, max_new_tokens, min_new_tokens):
            if not steps:
                first_token_s = time.perf_counter() - start
            steps.append(record)
            tokens.extend(new_tokens)
        reason = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return GenerationResult(
            list(prompt_ids), tokens, steps, time.perf_counter() - start, reason, first_token_s
        )

    def stream(
        self, prompt_ids: list[int], max_new_tokens: int = 128, min_new_tokens: int = 0
    ) -> Iterator[tuple[StepRecord, list[int]]]:
        """Yield (step record, tokens emitted by that step) until EOS or `max_new_tokens`. No stop
        token comes before the `min_new_tokens`-th new token: the target's distribution is the
        one conditioned on not stopping yet, in the target-only loop as in the speculative one."""
        if not prompt_ids:
            raise SpecKVError("the prompt is empty")
        if max_new_tokens < 1:
            raise SpecKVError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if min_new_tokens < 0:
            raise SpecKVError(f"min_new_tokens must be at least 0, got {min_new_tokens}")
        vocab = getattr(self.target.model.config, "vocab_size", None)
        # Holding back every token would leave nothing to decode (softmax of all -inf is NaN).
        if min_new_tokens > 0 and vocab and len({t for t in self.eos_ids if 0 <= t < vocab}) >= vocab:
            raise SpecKVError("min_new_tokens needs a token that is not a stop token")
        if self._streaming:
            raise SpecKVError("this decoder is already decoding a sequence; use one decoder per stream")
        self._streaming = True
        sequence = list(prompt_ids)  # `_steps` extends it with every verified token
        try:
            yield from self._steps(sequence, max_new_tokens, min_new_tokens)
        finally:
            self._streaming = False
            if self.drafter is not None:
                self.drafter.end(sequence)  # a stream stopped early still wrote verified text

    def _steps(
        self, tokens: list[int], max_new_tokens: int, min_new_tokens: int
    ) -> Iterator[tuple[StepRecord, list[int]]]:
        generator = None
        if self.sampling.seed is not None:
            generator = torch.Generator().manual_seed(self.sampling.seed)
        if self.controller is not None:
            self.controller.reset()
        if self.drafter is not None:
            self.drafter.begin()
        self.verifier.begin(len(tokens), min_new_tokens)
        produced = step = 0
        while produced < max_new_tokens:
            # Each step emits accepted + 1 tokens, so drafting more than remaining - 1 is waste.
            record, new_tokens = run_step(
                step,
                tokens,
                max_new_tokens - produced - 1,
                self.controller,
                self.drafter,
                self.verifier,
                self.sampling,
                self.eos_ids,
                generator,
            )
            tokens.extend(new_tokens)
            produced += len(new_tokens)
            step += 1
            yield record, new_tokens
            if new_tokens[-1] in self.eos_ids:
                return
