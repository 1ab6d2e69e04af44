"""One request's decoding, as the scheduler runs it, and the models every request shares.

`ServedModel` holds the models, loaded once (`speckv.decoding.builder`), and builds a fresh
`SpeculativeDecoder` per request: a decoder keeps one sequence's state (KV caches in its drafter
and verifier, the controller's adaptation), so concurrent sequences need their own, while the
weights are shared.

`Generation` is a scheduler job. The worker thread calls `start` and then `step` once per tick;
each step's new text goes to the request's asyncio queue as an event (`Delta`, then `Finished`
or `Failed`), handed over with `call_soon_threadsafe` because the queue belongs to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from speckv.decoding.batch import Batch, BatchPace
from speckv.decoding.builder import DecoderFactory
from speckv.decoding.engine import SequenceRun, SpeculativeDecoder
from speckv.decoding.models import context_length
from speckv.decoding.text import TextOutput
from speckv.decoding.verify import SamplingConfig
from speckv.records import StepRecord
from speckv.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class ServedModel:
    """The served models, loaded once by a `DecoderFactory`, under the id clients send. Each
    request gets its own decoder from the factory: its own drafter state and a copy of the
    controller, since both adapt to their sequence."""

    def __init__(self, factory: DecoderFactory, name: str):
        self.factory, self.name = factory, name
        self.target = factory.target
        self.draft = factory.draft_model  # the draft model, if one runs
        self.drafter_name = factory.drafter.name if factory.drafter is not None else None
        self.batch = Batch(factory)  # the running requests' KV rows and shared verify budget

    @property
    def controller(self):
        """The controller new requests' controllers are copies of (`learn_from` moves it on)."""
        return self.factory.controller

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def context_limit(self) -> int | None:
        """The longest sequence (prompt + completion) both models cover, when they say."""
        limits = [context_length(m) for m in (self.target, self.draft) if m is not None]
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    def describe(self) -> dict:
        config = self.factory.describe()
        return {key: config[key] for key in ("controller", "compression", "draft")}

    def learn_from(self, controller) -> None:
        """A finished request's controller: the next requests' start from what it learnt, as one
        decoder's controller does from one sequence to the next (SpecKV keeps its live cost
        estimate and half its acceptance evidence), instead of from the controller file each time.
        Called from the worker thread; `decoder` copies whichever is in place."""
        self.factory.controller = controller

    def decoder(
        self, sampling: SamplingConfig, ignore_eos: bool = False, stop_token_ids: Sequence[int] = ()
    ) -> SpeculativeDecoder:
        """A fresh decoder; it stops at the target's EOS (unless `ignore_eos`) and `stop_token_ids`."""
        eos = None  # the target's own
        if ignore_eos or stop_token_ids:
            eos = [*(() if ignore_eos else self.target.eos_token_ids), *stop_token_ids]
        return self.factory.new(sampling, eos_token_ids=eos)


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason); "abort"/"shutdown" when cut short
    text: str  # text released at the end (held back for a stop string that never came)
    prompt_tokens: int
    completion_tokens: int
    speckv: dict = field(default_factory=dict)


@dataclass
class Failed:
    message: str


class Generation:
    """A request being decoded: its decoder, text output, statistics and event queue. It stops at
    EOS (unless `ignore_eos`), at one of `stop_token_ids` or at a stop string; the decoder holds
    the stop tokens back until `min_tokens` new tokens, not stop strings (text the client asked
    to end at)."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        stops: list[str],
        metrics: ServerMetrics,
        ignore_eos: bool = False,
        stop_token_ids: Sequence[int] = (),
        min_tokens: int = 0,
    ):
        self.id = uuid.uuid4().hex[:24]
        self.served, self.prompt_ids, self.max_tokens = served, prompt_ids, max_tokens
        self.sampling, self.ignore_eos, self.metrics = sampling, ignore_eos, metrics
        self.min_tokens = min_tokens
        self.output = TextOutput(served.tokenizer, stops)
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancel = threading.Event()
        self.done = False
        self.arrival = self._last = time.perf_counter()
        self.first_token_at: float | None = None
        self.steps: list[StepRecord] = []
        self.generated = 0
        # Built here, on the event loop: construction runs no model (caches start empty), and an
        # option the decoder refuses becomes a 400 for this request instead of a failed job.
        self._decoder: SpeculativeDecoder | None = served.decoder(sampling, ignore_eos, stop_token_ids)
        self.run: SequenceRun | None = None
        self._eos_ids = self._decoder.eos_ids  # stop_token_ids only with ignore_eos
        self._last_token: int | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    # -- worker thread ---------------------------------------------------------------------
    def start(self) -> None:
        # The caches: rows of the batch's stores, handed back when the request ends.
        self.run = self.served.batch.start(self._decoder, self.prompt_ids, self.max_tokens, self.min_tokens)
        self.metrics.prompt_tokens.inc(len(self.prompt_ids))

    def step(self) -> bool:
        """One step alone; True when the request has finished."""
        return self.absorb(self.run.step())

    def absorb(self, result: tuple[StepRecord, list[int]] | None) -> bool:
        """A step's (record, new tokens) from a batch (None: it only read prompt); True when the
        request has finished."""
        if result is None:
            return False
        record, tokens = result
        now = time.perf_counter()
        self.steps.append(record)
        self.generated += len(tokens)
        self._last_token = tokens[-1]
        self.metrics.observe_step(record)
        self.metrics.generation_tokens.inc(len(tokens))
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            for _ in tokens:  # one observation per token: the step's time shared by its tokens
                self.metrics.time_per_output_token.observe((now - self._last) / len(tokens))
        self._last = now
        text = self.output.add(tokens)
        if text:
            self._emit(Delta(text))
        if self.output.stopped:
            return self._end("stop")
        if self._hit_eos() or self.generated >= self.max_tokens:
            return self._end(self._reason())
        return False

    def _hit_eos(self) -> bool:
        return self._last_token is not None and self._last_token in self._eos_ids

    def _reason(self) -> str:
        """OpenAI's finish_reason: "stop" for EOS (and stop strings), "length" for max_tokens."""
        return "stop" if self._hit_eos() else "length"

    def _end(self, reason: str) -> bool:
        if self._decoder is not None and self._decoder.controller is not None:
            self.served.learn_from(self._decoder.controller)
        self._close()
        completion = self.output.tokens if reason == "stop" and self.output.stopped else self.generated
        self.metrics.success.labels(finished_reason=reason).inc()
        self.metrics.e2e_latency.observe(time.perf_counter() - self.arrival)
        self._emit(Finished(reason, self.output.finish(), len(self.prompt_ids), completion, self.summary()))
        return True

    def abort(self, reason: str) -> None:
        self._close()
        self.metrics.failure.labels(reason=reason).inc()
        self._emit(Finished(reason, "", len(self.prompt_ids), self.generated, self.summary()))

    def fail(self, error: BaseException) -> None:
        self._close()
        self.metrics.failure.labels(reason="error").inc()
        self._emit(Failed(f"decoding failed: {type(error).__name__}: {error}"))

    def _close(self) -> None:
        self.done = True
        run, self.run = self.run, None
        self._decoder = None  # its KV caches are the request's largest state
        if run is not None:
            try:
                run.close()
            except Exception:  # the worker thread must outlive one request's cleanup
                log.exception("closing request %s failed", self.id)

    def summary(self) -> dict:
        """The request's speculative summary (the `speckv` field of responses)."""
        steps = len(self.steps)
        drafted = sum(s.gamma for s in self.steps)
        accepted = sum(s.accepted for s in self.steps)
        return {
            "steps": steps,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "mean_accepted_length": accepted / steps if steps else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_step": self.generated / steps if steps else 0.0,
            "time_to_first_token_s": (self.first_token_at - self.arrival) if self.first_token_at else None,
            **self.served.describe(),
        }

    def _emit(self, event) -> None:
        # A closed event loop (the server stopped) has nobody listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)


def step_generations(
    jobs: list[Generation], metrics: ServerMetrics, prompt_budget: int | None, pace: BatchPace | None = None
) -> list[bool]:
    """One tick of the running requests: one target pass verifies every request's draft and reads
    up to `prompt_budget` tokens of new prompts (`speckv.decoding.batch.step_together`); whether
    each request has finished."""
    results = jobs[0].served.batch.step([job.run for job in jobs], prompt_budget, pace)
    stepped = [result for result in results if result is not None]
    metrics.observe_pass(len(jobs), sum(record.gamma + 1 for record, _ in stepped))
    return [job.absorb(result) for job, result in zip(jobs, results, strict=True)]
