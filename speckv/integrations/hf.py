"""SpecKV's adaptive drafting inside Hugging Face `generate`, by one argument:

    from speckv.integrations.hf import SpecKVAssisted

    assisted = SpecKVAssisted(draft)   # the draft model; controller "speckv" by default
    out = model.generate(input_ids, custom_generate=assisted, max_new_tokens=128)

The output is transformers' own assisted output (in greedy fp32: the target's own greedy tokens),
with the number of tokens drafted per step decided by a SpecKV controller instead of HF's schedule.

Which extension point, and why. `generate` takes no argument naming a candidate generator: the
assisted loop (`GenerationMixin._assisted_decoding`) asks `_get_candidate_generator`, which picks one
of HF's own from generation-config fields. What `generate` does take is `custom_generate`, a
callable that it hands the prepared inputs (processors, stopping criteria, cache) to run the
decoding loop: transformers' documented extension point for decoding. `SpecKVAssisted` is that
callable. It runs transformers' own assisted loop, so verification, acceptance, cache cropping and
the end-of-sequence and length rules are HF's code, with one change: for that call the loop gets
`SpecKVCandidateGenerator`, a subclass of HF's `AssistedCandidateGenerator` (HF's extension point
for drafting), where

- the controller's `begin_step()` budget replaces `num_assistant_tokens` (capped by HF's own length
  rule); 0 makes the step a plain target step;
- after each token HF's assistant drafts, a stopping criterion computes its signals from the
  assistant's scores as SpecKV's drafters do (`speckv.decoding.signals.logit_signals`) and asks
  `continue_drafting` (not at the budget or an end-of-sequence token, as in
  `speckv.decoding.step.run_step`); HF's confidence threshold is off, the controller decides;
- in greedy decoding `verify_count` may keep a prefix of the drafted tokens for verification;
- after HF verifies, `update_candidate_strategy` (HF's hook) gives `end_step` the step's record:
  tokens drafted, verified and accepted, drafting and verification seconds, as the engine's.

With a callable `custom_generate`, transformers 5 passes it neither `assistant_model` nor
`streamer` (it rebuilds the decoding arguments from the callable's own parameters), so the draft
comes with the callable and streaming is not available on this path.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.candidate_generator import (
    AssistedCandidateGenerator,
    _prepare_attention_mask,
    _prepare_position_ids,
    _prepare_token_type_ids,
)

from speckv.controllers import Controller, Drafts, make_controller
from speckv.decoding.local_costs import give_costs
from speckv.decoding.models import LoadedModel, model_level, wrap_model
from speckv.decoding.signals import logit_signals
from speckv.decoding.step import asked_budget, asked_prefix
from speckv.errors import SpecKVError
from speckv.records import StepRecord, TokenSignals


class _AskController(StoppingCriteria):
    """The assistant's stopping criterion for one step: records each drafted token's signals and
    asks the controller whether to draft another."""

    def __init__(self, controller: Controller, record: StepRecord, start: int, budget: int, eos_ids):
        self.controller, self.record, self.eos_ids = controller, record, eos_ids
        self.start, self.budget = start, budget  # the sequence's length before drafting; the cap
        self.seconds = 0.0  # spent in the controller: not drafting

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        token = int(input_ids[0, -1])
        # A logits processor's -inf (a token it rules out) must read as probability 0, not NaN.
        logits = scores[-1][0].clamp(min=torch.finfo(scores[-1].dtype).min)
        entropy, confidence, token_prob = logit_signals(logits, token)
        record = self.record
        record.draft_entropy.append(entropy)
        record.draft_confidence.append(confidence)
        record.draft_token_prob.append(token_prob)
        position = input_ids.shape[-1] - self.start
        go_on = True
        # At the budget or an end-of-sequence token drafting stops anyway: nothing to ask.
        if token not in self.eos_ids and position < self.budget:
            asked = time.perf_counter()
            go_on = self.controller.continue_drafting(
                TokenSignals(position, entropy, confidence, token_prob, parent=position - 2)
            )
            self.seconds += time.perf_counter() - asked
        return torch.full((input_ids.shape[0],), not go_on, dtype=torch.bool, device=input_ids.device)


class SpecKVCandidateGenerator(AssistedCandidateGenerator):
    """HF's assisted candidate generator with a SpecKV controller deciding each step's draft
    length; `records` holds one `StepRecord` per step."""

    def __init__(
        self,
        input_ids: torch.LongTensor,
        assistant_model,
        generation_config,
        model_kwargs: dict,
        inputs_tensor: torch.Tensor | None = None,
        logits_processor=None,
        *,
        controller: Controller,
    ):
        super().__init__(
            input_ids, assistant_model, generation_config, model_kwargs, inputs_tensor, logits_processor
        )
        self.controller = controller
        # HF's confidence threshold would stop drafting behind the controller's back.
        self.generation_config.assistant_confidence_threshold = 0.0
        eos = generation_config.eos_token_id
        self.eos_ids = frozenset(() if eos is None else (eos,) if isinstance(eos, int) else eos)
        self.records: list[StepRecord] = []
        self._ask: _AskController | None = None
        self._verify_started = 0.0

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        started = time.perf_counter()
        wanted = asked_budget(self.controller)
        # HF's length rule (`_calculate_new_tokens`) caps what its schedule asks for; the schedule's
        # own value is put back after, so HF's end-of-generation write-back of a "heuristic" schedule
        # leaves the assistant's settings as they were.
        schedule, self.num_assistant_tokens = self.num_assistant_tokens, wanted
        try:
            budget = self._calculate_new_tokens(input_ids)[1]
            start = input_ids.shape[-1]
            record = StepRecord(
                step=len(self.records), gamma_budget=budget, gamma=0, accepted=0, tokens_produced=0
            )
            self._ask = _AskController(self.controller, record, start, budget, self.eos_ids)
            record.controller_time_s = time.perf_counter() - started
            drafting = time.perf_counter()
            candidate_ids, candidate_logits = super().get_candidates(input_ids, **kwargs)
        finally:
            self.num_assistant_tokens = schedule
        record.drafted = candidate_ids.shape[-1] - start
        record.parents = list(range(-1, record.drafted - 1))  # a chain
        record.draft_time_s = time.perf_counter() - drafting - self._ask.seconds
        record.controller_time_s += self._ask.seconds
        if record.drafted and not self.generation_config.do_sample:
            asked = time.perf_counter()
            keep = asked_prefix(self.controller, record)
            record.controller_time_s += time.perf_counter() - asked
            candidate_ids = candidate_ids[:, : start + keep]
            candidate_logits = candidate_logits[:, :keep] if keep else None
        self._verify_started = time.perf_counter()
        return candidate_ids, candidate_logits

    def _update_past_and_masks(self, input_ids: torch.LongTensor, *args, **kwargs):
        # HF brings the assistant's mask and positions up to the sequence only once the assistant
        # has a cache; HF always drafts at its first step, but a controller may not (budget 0), and
        # the assistant's first pass must then still cover the whole sequence. (The other
        # arguments pass through: their names changed between transformers 5.24 and 5.25.)
        if super()._update_past_and_masks(input_ids, *args, **kwargs):
            return True
        encoder_decoder = self.assistant_model.config.is_encoder_decoder
        self.assistant_kwargs = _prepare_attention_mask(
            self.assistant_kwargs, input_ids.shape[-1], encoder_decoder
        )
        self.assistant_kwargs = _prepare_position_ids(
            self.assistant_kwargs, input_ids.shape[-1], encoder_decoder
        )
        self.assistant_kwargs = _prepare_token_type_ids(self.assistant_kwargs, input_ids.shape[-1])
        return False

    def _prepare_generation_args(self, input_ids: torch.LongTensor, min_new_tokens: int, max_new_tokens: int):
        args = super()._prepare_generation_args(input_ids, min_new_tokens, max_new_tokens)
        args["stopping_criteria"] = StoppingCriteriaList([self._ask])
        return args

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """After HF's verification: the step's record to the controller. HF's own update (its
        heuristic schedule, its threshold's fit) is not run: the controller plans the next step."""
        record = self._ask.record
        record.verify_time_s = time.perf_counter() - self._verify_started
        record.gamma = scores.shape[1] - 1  # HF scores the verified tokens and the one after them
        record.accepted = int(num_matches)
        record.tokens_produced = input_ids.shape[-1] - self._ask.start
        record.depth = record.gamma
        record.parents = record.parents[: record.gamma]
        ended = time.perf_counter()
        self.controller.end_step(record)
        record.controller_time_s += time.perf_counter() - ended
        self.records.append(record)


class SpecKVAssisted:
    """Pass as `model.generate(..., custom_generate=SpecKVAssisted(draft))`: transformers' assisted
    generation with `draft` and a SpecKV controller.

    `draft`: the assistant, a transformers model or a SpecKV `LoadedModel` (e.g. `load_draft`; a
    reduced-vocabulary draft head is shown to HF on the full vocabulary, `hf_assistant`).
    `controller`: a spec (`speckv.controllers.make_controller`: "speckv", "fixed:4", "heuristic", …)
    or a `Controller`. A SpecKV controller plans with the cost curve `costs` names (default auto:
    measured for this pair on this machine on first use, then cached; `speckv.decoding.local_costs`),
    which needs the target's tokenizer: `tokenizer`, else the draft's (a `LoadedModel`'s), else
    loaded from where the target was loaded from. `compression` names the target's level when it
    cannot be read from the model (`model_level`).

    One object serves any number of `generate` calls, one at a time; its controller carries what
    it learnt (live costs, calibration) from one to the next, as in SpecKV's own engine."""

    branches = False  # to the controller (`Controller.bind`) this is the drafter: HF drafts chains

    def __init__(
        self,
        draft,
        controller: str | Controller = "speckv",
        *,
        tokenizer=None,
        costs: str = "auto",
        gamma_max: int = 20,
        compression: str | None = None,
        progress: bool = True,
    ):
        if isinstance(draft, LoadedModel):
            self.loaded, self.assistant = draft, hf_assistant(draft)
        else:
            self.loaded, self.assistant = wrap_model(draft, tokenizer), draft
        self.spec, self.tokenizer, self.costs = controller, tokenizer, costs
        self.gamma_max, self.compression, self.progress = gamma_max, compression, progress
        self.controller: Controller | None = None
        self.cost_source: str | None = None  # where a SpecKV controller's cost curve came from
        self.steps: list[StepRecord] = []  # the last generation's step records
        self._model = None  # the target the controller was prepared for

    def prepare(self, target) -> Controller:
        """The controller for `target` (a transformers model or a `LoadedModel`), built on its first
        generation, measuring the cost curve if need be; call it first to keep that out of a timing."""
        model = target.model if isinstance(target, LoadedModel) else target
        if self._model is model:
            return self.controller
        level = (
            target.compression if isinstance(target, LoadedModel) else self.compression or model_level(model)
        )
        controller = (
            self.spec
            if isinstance(self.spec, Controller)
            else make_controller(self.spec, gamma_max=self.gamma_max, compression=level)
        )
        if controller.drafts is Drafts.TREES:
            raise SpecKVError(
                f"{controller.describe()} plans token trees; transformers' assisted generation verifies chains"
            )
        vocab, draft_vocab = (m.config.get_text_config().vocab_size for m in (model, self.assistant))
        if vocab != draft_vocab:
            raise SpecKVError(f"the draft's vocabulary ({draft_vocab}) is not the target's ({vocab})")
        controller.bind(self)
        from speckv.controllers.speckv import SpecKVController  # loads numpy models: only when used

        self.cost_source = None
        if isinstance(controller, SpecKVController):
            if not isinstance(target, LoadedModel):
                target = wrap_model(model, self._tokenizer(model), compression=level)
            self.cost_source = give_costs(controller, self.costs, target, self, self.progress)
        self.controller, self._model = controller, model
        return controller

    def _tokenizer(self, model):
        """The target's tokenizer: costs "auto" measures on a prompt it makes."""
        tokenizer = self.tokenizer if self.tokenizer is not None else self.loaded.tokenizer
        if tokenizer is not None or self.costs != "auto":
            return tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError, TypeError) as error:
            raise SpecKVError(
                "measuring this pair's cost curve needs the target's tokenizer: pass tokenizer= to "
                f"SpecKVAssisted, or costs='shipped' ({type(error).__name__}: {error})"
            ) from None

    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        inputs_tensor: torch.Tensor | None = None,
        **model_kwargs,
    ):
        """`generate`'s decoding loop: transformers' assisted loop with a SpecKV candidate generator."""
        controller = self.prepare(model)
        controller.reset()
        made: list[SpecKVCandidateGenerator] = []

        def candidate_generator(
            *,
            input_ids,
            inputs_tensor,
            assistant_model,
            generation_config,
            logits_processor,
            model_kwargs,
            **_,
        ):  # HF's arguments for its own generator (the tokenizers, for other vocabularies, are None)
            made.append(
                SpecKVCandidateGenerator(
                    input_ids,
                    assistant_model,
                    generation_config,
                    model_kwargs,
                    inputs_tensor,
                    logits_processor,
                    controller=controller,
                )
            )
            return made[-1]

        with _candidates_from(model, candidate_generator):
            output = type(model)._assisted_decoding(
                model,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                inputs_tensor=inputs_tensor,
                assistant_model=self.assistant,
                **model_kwargs,
            )
        self.steps = made[0].records
        return output


@contextmanager
def _candidates_from(model, make: Callable) -> Iterator[None]:
    """`model._get_candidate_generator` is `make` for the duration: transformers' assisted loop asks
    that method for its generator and takes none as an argument. An attribute of the instance
    shadows the class's method and is deleted after, leaving the model as it was."""
    model._get_candidate_generator = make
    try:
        yield
    finally:
        del model._get_candidate_generator


class _ScatterHead(torch.nn.Module):
    """Puts a reduced-vocabulary head's logits on the full vocabulary (the rest at the lowest
    value: probability 0), for callers that need full-vocabulary logits."""

    def __init__(self, head: torch.nn.Module, vocab_map: torch.Tensor, vocab_size: int):
        super().__init__()
        self.head, self.vocab_map, self.vocab_size = head, vocab_map, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        reduced = self.head(hidden)
        full = reduced.new_full((*reduced.shape[:-1], self.vocab_size), torch.finfo(reduced.dtype).min)
        full[..., self.vocab_map] = reduced
        return full


def hf_assistant(draft: LoadedModel):
    """The draft as a model transformers' assisted generation accepts (full-vocabulary logits)."""
    if draft.vocab_map is None:
        return draft.model
    assistant = copy.copy(draft.model)
    assistant._modules = dict(draft.model._modules)  # share the layers, not the module table
    vocab_size = draft.model.config.vocab_size
    assistant.lm_head = _ScatterHead(draft.model.lm_head, draft.vocab_map, vocab_size)
    return assistant
