"""The speculative decoding loop, one sequence at a time (`speckv.decoding.batch` steps several
sequences' runs together, one target pass for all).

Each step is `speckv.decoding.step.run_step`: the controller sets a drafting budget, the drafter
proposes tokens (asking the controller whether to go on), the target verifies them in one pass,
and both sides roll back to the kept sequence. Without a drafter each step is one plain target
decoding step, which makes the same loop the target-only baseline. The loop knows no specific
controller or drafter.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator

import torch

from speckv.controllers import Controller
from speckv.decoding.cache import Feed, ForwardOutput
from speckv.decoding.drafters import Drafter, model_drafter
from speckv.decoding.models import LoadedModel
from speckv.decoding.step import DraftedStep, drafting, run_step, settle_step
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
        run = self.start(prompt_ids, max_new_tokens, min_new_tokens)
        try:
            while not run.done:
                yield run.step()
        finally:
            run.close()

    def start(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 128,
        min_new_tokens: int = 0,
        cache=None,
        draft_store=None,
    ) -> SequenceRun:
        """Begin decoding a sequence, to be stepped alone (`SequenceRun.step`) or in a batch with
        other decoders' sequences (`speckv.decoding.batch.step_together`: then `cache` is the
        sequence's row of the batch's `SlotStore`, and a draft model's chains keep their cache in
        a row of `draft_store`, if given, so the batch drafts for all its sequences at once;
        `close` hands the rows back)."""
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
        return SequenceRun(self, list(prompt_ids), max_new_tokens, min_new_tokens, cache, draft_store)


class SequenceRun:
    """One sequence of a decoder, from its prompt to EOS or its length: the tokens so far and the
    step counter. `step` runs the next step alone; a batch runs the same step in halves around
    a shared target pass (`drafting`, `feed`, `settle`), or reads a chunk of a long prompt first
    (`prompt_chunk`), so other sequences need not wait for the whole prompt."""

    def __init__(
        self,
        decoder: SpeculativeDecoder,
        prompt: list[int],
        max_new_tokens: int,
        min_new_tokens: int,
        cache=None,
        draft_store=None,
    ):
        self._chain = decoder.drafter.chain_drafter() if draft_store is not None and decoder.drafter else None
        if self._chain is not None and draft_store.loaded is not self._chain.loaded:
            decoder._streaming = False
            raise SpecKVError(
                f"the draft store holds {draft_store.loaded.name}'s caches, not {self._chain.name}'s"
            )
        self.decoder, self.tokens, self.max_new_tokens = decoder, prompt, max_new_tokens
        self._own_cache = decoder.verifier.model
        if cache is not None:  # the target's cache lives in a batch's row for this sequence
            decoder.verifier.model = cache
        if self._chain is not None:  # so does the draft model's, in the batch's draft store
            self._own_draft_cache, self._chain.model = self._chain.model, draft_store.acquire()
        self.generator = None
        if decoder.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(decoder.sampling.seed)
        if decoder.controller is not None:
            decoder.controller.reset()
        if decoder.drafter is not None:
            decoder.drafter.begin()
        decoder.verifier.begin(len(prompt), min_new_tokens)
        self.produced = self.steps = 0
        self.done = self.closed = False

    @property
    def _cap(self) -> int:
        # Each step emits accepted + 1 tokens, so drafting more than remaining - 1 is waste.
        return self.max_new_tokens - self.produced - 1

    def step(self) -> tuple[StepRecord, list[int]]:
        d = self.decoder
        record, new_tokens = run_step(
            self.steps,
            self.tokens,
            self._cap,
            d.controller,
            d.drafter,
            d.verifier,
            d.sampling,
            d.eos_ids,
            self.generator,
        )
        return self._advance(record, new_tokens)

    def unread_prompt(self) -> int:
        """Prompt tokens the target has not read, the last one left for the first step (which
        needs its logits); 0 once stepping began. Only a drafter that reads no target features
        lets its prompt be read in chunks (the feature head needs every position's)."""
        if self.steps or self.decoder.verifier.hidden_layers:
            return 0
        return max(0, len(self.tokens) - 1 - self.decoder.verifier.model.length)

    def prompt_chunk(self, size: int) -> Feed:
        """The next `size` unread prompt tokens (one row of logits, unread: 0 would mean all rows)."""
        start = self.decoder.verifier.model.length
        return Feed(self.tokens[start : start + min(size, self.unread_prompt())], keep=1)

    def drafting(self) -> Generator[list[int], None, DraftedStep]:
        """The next step's drafting in rounds (`speckv.decoding.step.drafting`)."""
        d = self.decoder
        return drafting(
            self.steps, self.tokens, self._cap, d.controller, d.drafter, d.sampling, d.eos_ids, self.generator
        )

    def feed(self, pending: DraftedStep) -> Feed:
        return self.decoder.verifier.feed_for(self.tokens, pending.drafted, pending.parents)

    def settle(
        self, pending: DraftedStep, out: ForwardOutput, verify_start: float
    ) -> tuple[StepRecord, list[int]]:
        d = self.decoder
        verdict = d.verifier.judge(
            out, self.tokens, pending.drafted, pending.parents, pending.draft_probs, self.generator
        )
        record, new_tokens = settle_step(
            pending, verdict, self.tokens, d.controller, d.drafter, d.verifier, d.eos_ids, verify_start
        )
        return self._advance(record, new_tokens)

    def _advance(self, record: StepRecord, new_tokens: list[int]) -> tuple[StepRecord, list[int]]:
        self.tokens.extend(new_tokens)
        self.produced += len(new_tokens)
        self.steps += 1
        self.done = self.produced >= self.max_new_tokens or new_tokens[-1] in self.decoder.eos_ids
        return record, new_tokens

    def close(self) -> None:
        """The sequence is over (or abandoned): its decoder may start another; a batch row goes
        back; the drafter sees the sequence's verified text (drafts from earlier requests)."""
        if self.closed:
            return
        self.closed = True
        if self.decoder.drafter is not None:
            self.decoder.drafter.end(self.tokens)
        if self.decoder.verifier.model is not self._own_cache:
            self.decoder.verifier.model.release()
            self.decoder.verifier.model = self._own_cache
        if self._chain is not None:
            self._chain.model.release()
            self._chain.model = self._own_draft_cache
        self.done = True
        self.decoder._streaming = False
