"""The speculative decoding loop (batch size 1).

One step: the controller sets a drafting budget; the draft proposes tokens one at a time with its
KV cache, recording signals and asking the controller whether to go on; the target scores all
proposed tokens in one forward pass; verification keeps a prefix and adds one target token;
both caches are cropped back to the kept sequence. Without a draft each step is one plain
target decoding step, which makes the same loop the target-only baseline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
from transformers import DynamicCache

from speckv.controllers import Controller
from speckv.decoding.models import LoadedModel
from speckv.decoding.signals import signal_tensor
from speckv.decoding.verify import SamplingConfig, greedy_verify, rejection_verify, sample, warp_probs
from speckv.errors import SpecKVError
from speckv.records import GenerationResult, StepRecord, TokenSignals


class SpeculativeDecoder:
    """Lossless speculative decoding of `target` with `draft`; `draft=None` decodes the target alone."""

    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None = None,
        controller: Controller | None = None,
        sampling: SamplingConfig | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ):
        """`eos_token_ids` overrides the target's own stop tokens (an empty tuple: never stop early)."""
        if draft is not None and controller is None:
            raise SpecKVError("a draft model needs a controller (e.g. fixed:4)")
        sampling = sampling or SamplingConfig()
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise SpecKVError("temperature must be ≥ 0 and top_p in (0, 1]")
        self.target, self.draft, self.controller, self.sampling = target, draft, controller, sampling
        self.eos_ids = frozenset(target.eos_token_ids if eos_token_ids is None else eos_token_ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 128) -> GenerationResult:
        start = time.perf_counter()
        tokens: list[int] = []
        steps: list[StepRecord] = []
        for record, new_tokens in self.stream(prompt_ids, max_new_tokens):
            steps.append(record)
            tokens.extend(new_tokens)
        reason = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return GenerationResult(list(prompt_ids), tokens, steps, time.perf_counter() - start, reason)

    def stream(
        self, prompt_ids: list[int], max_new_tokens: int = 128
    ) -> Iterator[tuple[StepRecord, list[int]]]:
        """Yield (step record, tokens emitted by that step) until EOS or `max_new_tokens`."""
        if not prompt_ids:
            raise SpecKVError("the prompt is empty")
        if max_new_tokens < 1:
            raise SpecKVError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        generator = None
        if self.sampling.seed is not None:
            generator = torch.Generator().manual_seed(self.sampling.seed)
        if self.controller is not None:
            self.controller.reset()
        self._target_cache = DynamicCache(config=self.target.model.config)
        self._draft_cache = DynamicCache(config=self.draft.model.config) if self.draft else None
        self._target_len = self._draft_len = 0
        tokens = list(prompt_ids)
        produced = 0
        step = 0
        while produced < max_new_tokens:
            started = time.perf_counter()
            # Each step emits accepted + 1 tokens, so drafting more than remaining - 1 is waste.
            budget = min(self.controller.begin_step(), max_new_tokens - produced - 1) if self.draft else 0
            record = StepRecord(step=step, gamma_budget=budget, gamma=0, accepted=0, tokens_produced=0)
            record.controller_time_s = time.perf_counter() - started

            drafted, draft_probs = self._draft(tokens, budget, record, generator)
            record.drafted = len(drafted)
            if drafted and self.sampling.greedy:
                asked = time.perf_counter()
                keep = self.controller.verify_count(record)
                if not 0 <= keep <= len(drafted):
                    raise SpecKVError(
                        f"{self.controller.describe()} asked to verify {keep} of {len(drafted)} tokens"
                    )
                drafted = drafted[:keep]
                record.controller_time_s += time.perf_counter() - asked
            verify_start = time.perf_counter()
            accepted, next_token = self._verify(tokens, drafted, draft_probs, generator)
            new_tokens = drafted[:accepted] + [next_token]
            hit_eos = next((i for i, t in enumerate(new_tokens) if t in self.eos_ids), None)
            if hit_eos is not None:
                new_tokens = new_tokens[: hit_eos + 1]
            kept = len(tokens) + accepted  # sequence both caches may keep (the new token is not fed yet)
            tokens.extend(new_tokens)
            self._crop(kept)
            record.verify_time_s = time.perf_counter() - verify_start

            record.gamma, record.accepted, record.tokens_produced = len(drafted), accepted, len(new_tokens)
            if self.controller is not None:
                end_start = time.perf_counter()
                self.controller.end_step(record)
                record.controller_time_s += time.perf_counter() - end_start
            produced += len(new_tokens)
            step += 1
            yield record, new_tokens
            if hit_eos is not None:
                return

    def _draft(
        self, tokens: list[int], budget: int, record: StepRecord, generator: torch.Generator | None
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Propose up to `budget` tokens; fills the record's signals and draft/controller times."""
        if budget == 0:
            return [], []
        draft_start = time.perf_counter()
        controller_time = 0.0
        drafted: list[int] = []
        draft_probs: list[torch.Tensor] = []  # full-vocabulary distributions, sampling only
        vocab_map = self.draft.vocab_map
        feed = tokens[self._draft_len :]
        for position in range(1, budget + 1):
            logits = self._forward(self.draft, self._draft_cache, feed, keep=1)[0]
            self._draft_len += len(feed)
            if self.sampling.greedy:
                index = int(logits.argmax())
            else:
                probs = warp_probs(logits, self.sampling)
                index = sample(probs, generator)
                draft_probs.append(self._full_vocab(probs, vocab_map))
            token = index if vocab_map is None else int(vocab_map[index])
            entropy, confidence, token_prob = signal_tensor(
                torch.log_softmax(logits.float(), -1), index
            ).tolist()
            record.draft_entropy.append(entropy)
            record.draft_confidence.append(confidence)
            record.draft_token_prob.append(token_prob)
            drafted.append(token)
            if token in self.eos_ids or position == budget:
                break
            asked = time.perf_counter()
            go_on = self.controller.continue_drafting(TokenSignals(position, entropy, confidence, token_prob))
            controller_time += time.perf_counter() - asked
            if not go_on:
                break
            feed = [token]
        record.controller_time_s += controller_time
        record.draft_time_s = time.perf_counter() - draft_start - controller_time
        return drafted, draft_probs

    def _verify(
        self,
        tokens: list[int],
        drafted: list[int],
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """One target pass over the unseen tokens plus the draft; returns (accepted, next token)."""
        feed = tokens[self._target_len :] + drafted
        logits = self._forward(self.target, self._target_cache, feed, keep=len(drafted) + 1)
        self._target_len += len(feed)
        if self.sampling.greedy:
            if not drafted:
                return 0, int(logits[0].argmax())
            return greedy_verify(torch.tensor(drafted, device=logits.device), logits)
        target_probs = warp_probs(logits, self.sampling)
        if not drafted:
            return 0, sample(target_probs[0], generator)
        draft_tokens = torch.tensor(drafted, device=logits.device)
        return rejection_verify(draft_tokens, torch.stack(draft_probs), target_probs, generator)

    def _crop(self, kept: int) -> None:
        """Roll both caches back to the first `kept` tokens of the sequence."""
        if self._target_len > kept:
            self._target_cache.crop(kept - self._target_len)
            self._target_len = kept
        if self.draft is not None and self._draft_len > kept:
            self._draft_cache.crop(kept - self._draft_len)
            self._draft_len = kept

    @staticmethod
    def _forward(loaded: LoadedModel, cache: DynamicCache, feed: list[int], keep: int) -> torch.Tensor:
        """Logits (keep, V) of the last `keep` positions after feeding `feed` through the cache."""
        input_ids = torch.tensor([feed], device=loaded.device)
        with torch.inference_mode():
            out = loaded.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0]

    def _full_vocab(self, probs: torch.Tensor, vocab_map: torch.Tensor | None) -> torch.Tensor:
        """A reduced-vocabulary draft's distribution placed on the target's vocabulary."""
        if vocab_map is None:
            return probs
        full = torch.zeros(self.target.model.config.vocab_size, device=probs.device)
        return full.index_copy_(0, vocab_map, probs)
