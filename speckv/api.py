"""SpecKV from Python: load a pair once, then generate or stream.

    import speckv
    pair = speckv.load("demo")
    print(pair.generate("Name three uses of a hash table.", max_new_tokens=48).text)

`load` takes what the CLI takes (a path, a .gguf file, a cached hub id, `demo`) or model objects
already loaded with transformers, and builds through the same `DecoderSpec` as every command, so
a controller, drafter or cost curve means the same here as in `speckv generate`. Keyword names
follow Hugging Face `generate` where they mean the same thing (`max_new_tokens`, `do_sample`,
`temperature`, `top_p`). Output is lossless: greedy output is the target's own greedy output;
sampled output follows the target's distribution.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from speckv.decoding.builder import DecoderFactory, DecoderSpec
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel, encode_messages, encode_prompt, wrap_model
from speckv.decoding.text import TextOutput
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import GenerationResult, StepRecord

Prompt = str | Sequence[dict] | Sequence[int]  # text, chat messages, or token ids
_DEFAULT = "default"  # `draft` left out: the demo's drafter for the demo target, else none


@dataclass
class Completion:
    """One generation: the text, its token ids and what speculation did."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    summary: dict  # steps, mean accepted, acceptance, tokens/s, … and the decoder's configuration
    steps: list[StepRecord] = field(repr=False, default_factory=list)


def load(
    target,
    draft=_DEFAULT,
    *,
    tokenizer=None,
    controller: str | None = None,
    compression: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    costs: str = "auto",
    gamma_max: int = 20,
    progress: bool = True,
) -> SpecKV:
    """Load a target and a drafter once. `target`: a path, .gguf file, cached hub id or "demo",
    or a transformers model (then pass its `tokenizer`). `draft`: a draft path or model object,
    "ngram", "suffix" (n-grams also from this object's earlier calls), "DRAFT+ngram", or None for
    the target alone (default: the demo's drafter for the demo target, else none). `controller`:
    "speckv", "fixed:4", "heuristic", "tree:8", … (default: the shipped SpecKV controller for the
    demo pair, else fixed:4). `costs`: "auto" measures this machine's cost curve on first use
    (cached), "shipped", or a cost file."""
    if not isinstance(target, str | LoadedModel):
        if tokenizer is None:
            raise SpecKVError("a loaded model needs its tokenizer: pass tokenizer=")
        target = wrap_model(target, tokenizer)
    elif tokenizer is not None:
        raise SpecKVError("tokenizer= goes with a model object; a path or id brings its own")
    if draft is not None and not isinstance(draft, str | LoadedModel) and hasattr(draft, "config"):
        loaded_target = target if isinstance(target, LoadedModel) else None
        draft = wrap_model(draft, loaded_target.tokenizer if loaded_target else None, "draft")
    spec = DecoderSpec(
        target,
        draft=None if draft == _DEFAULT else draft,
        controller=controller,
        compression=compression,
        device=device,
        threads=threads,
        gamma_max=gamma_max,
        costs=costs,
        target_only=draft is None,
    )
    return SpecKV(spec.build(progress))


class SpecKV:
    """A loaded pair. One `generate` or `stream` at a time per sampling setting reuses one decoder,
    so SpecKV's live estimates of this machine and this text carry over from call to call."""

    def __init__(self, decoders: DecoderFactory):
        self.decoders = decoders
        self._idle: dict[SamplingConfig, SpeculativeDecoder] = {}

    @property
    def tokenizer(self):
        return self.decoders.target.tokenizer

    @property
    def config(self) -> dict:
        """Target, draft, precision, threads, controller and its cost curve."""
        return self.decoders.describe()

    def __repr__(self) -> str:
        config = self.config
        how = f"draft {config['draft']}, {config['controller']}" if config["draft"] else "target only"
        return f"SpecKV({config['target']} {config['precision']}, {how})"

    def encode(self, prompt: Prompt, raw: bool = False) -> list[int]:
        """Token ids of text (chat-templated unless `raw`), chat messages, or ids as given."""
        if isinstance(prompt, str):
            return encode_prompt(self.tokenizer, prompt, raw=raw)
        items = list(prompt)
        if items and all(isinstance(item, dict) for item in items):
            return encode_messages(self.tokenizer, items)
        if items and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            return items
        raise SpecKVError("a prompt is text, a list of chat messages ({'role', 'content'}) or token ids")

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        min_new_tokens: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        raw: bool = False,
    ) -> Completion:
        """Decode one prompt to the end: EOS (not before `min_new_tokens`), a `stop` string (cut
        from the text) or `max_new_tokens`. Greedy unless `do_sample` (or a temperature > 0)."""
        sampling = sampling_config(do_sample, temperature, top_p, top_k, min_p, seed)
        chunks = self._run(prompt, max_new_tokens, min_new_tokens, sampling, stop, raw)
        text = "".join(chunks)
        return chunks.completion(text)

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        min_new_tokens: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        raw: bool = False,
    ) -> Iterator[str]:
        """The same decoding as `generate`, yielding text as each step completes it."""
        sampling = sampling_config(do_sample, temperature, top_p, top_k, min_p, seed)
        yield from self._run(prompt, max_new_tokens, min_new_tokens, sampling, stop, raw)

    def _run(self, prompt, max_new_tokens, min_new_tokens, sampling, stop, raw) -> _Chunks:
        prompt_ids = self.encode(prompt, raw)
        self.decoders.check_context(len(prompt_ids), max_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop)
        decoder = self._decoder(sampling)
        return _Chunks(self, decoder, prompt_ids, max_new_tokens, min_new_tokens, stops)

    def _decoder(self, sampling: SamplingConfig) -> SpeculativeDecoder:
        decoder = self._idle.pop(sampling, None)
        return decoder if decoder is not None else self.decoders.new(sampling)

    def _release(self, sampling: SamplingConfig, decoder: SpeculativeDecoder) -> None:
        self._idle[sampling] = decoder


def sampling_config(
    do_sample: bool | None,
    temperature: float | None,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> SamplingConfig:
    """HF's meaning: greedy unless `do_sample` (default: sample when a temperature > 0 is given),
    temperature 1 when sampling without one; the filters are checked either way."""
    SamplingConfig(0.0 if temperature is None else temperature, top_p, seed, top_k, min_p).check()
    sample = bool(temperature) if do_sample is None else do_sample
    if not sample:  # the filters never move the argmax: greedy is greedy
        return SamplingConfig(0.0, 1.0, seed)
    if temperature == 0:
        raise SpecKVError("do_sample=True needs a temperature > 0 (or leave it out: 1.0)")
    return SamplingConfig(1.0 if temperature is None else temperature, top_p, seed, top_k, min_p)


class _Chunks:
    """The text pieces of one decoding, as an iterator; `completion` sums them up at the end."""

    def __init__(self, owner: SpecKV, decoder: SpeculativeDecoder, prompt_ids, max_new, min_new, stops):
        self.owner, self.decoder, self.prompt_ids = owner, decoder, prompt_ids
        self.max_new_tokens, self.min_new_tokens = max_new, min_new
        self.output = TextOutput(owner.tokenizer, stops)
        self.tokens: list[int] = []
        self.steps: list[StepRecord] = []
        self.seconds = self.first_token_s = 0.0

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        stream = self.decoder.stream(self.prompt_ids, self.max_new_tokens, self.min_new_tokens)
        try:
            for record, new_tokens in stream:
                if not self.steps:
                    self.first_token_s = time.perf_counter() - started
                self.steps.append(record)
                self.tokens.extend(new_tokens)
                text = self.output.add(new_tokens)
                if text:
                    yield text
                if self.output.stopped:
                    return
            tail = self.output.finish()
            if tail:
                yield tail
        finally:
            self.seconds = time.perf_counter() - started
            stream.close()
            self.owner._release(self.decoder.sampling, self.decoder)

    def completion(self, text: str) -> Completion:
        # Tokens after the one that completed a stop string were decoded but are not output.
        tokens = self.tokens[: self.output.tokens] if self.output.stopped else self.tokens
        eos = bool(tokens) and tokens[-1] in self.decoder.eos_ids
        result = GenerationResult(
            self.prompt_ids, tokens, self.steps, self.seconds, "eos" if eos else "length", self.first_token_s
        )
        reason = "stop" if self.output.stopped or eos else "length"
        summary = {**result.summary(), **self.owner.config}
        return Completion(text, tokens, self.prompt_ids, reason, summary, self.steps)
