"""One way to build a decoder: a `DecoderSpec` (target, drafter, controller, compression, device,
threads, cost curve) resolved in one place into a `DecoderFactory`.

Every entry point builds through here — `speckv generate`, `serve`, `check-lossless`, `demo`,
`compare` and the Python API — so they agree on what a spec means: the default controller of a
pair, that a drafter is built for what the controller's budget counts (`Controller.drafts`:
chains, trees or either), that a tree budget needs a drafter that branches, and that a SpecKV
controller plans with the cost curve of the machine it runs on (`local_costs`).

The factory holds what loading made once (models, a prototype drafter and controller) and hands
out decoders that share the weights but own their state (KV caches, the controller's adaptation):
one per concurrent sequence in the server, one for all prompts of a command.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from speckv.controllers import Controller, Drafts, check_gamma, default_controller, make_controller
from speckv.decoding.draft_files import DEMO_DRAFTER
from speckv.decoding.drafters import Drafter, make_drafter, model_drafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.local_costs import give_costs
from speckv.decoding.models import (
    LoadedModel,
    check_context,
    load_model,
    resolve_compression,
    resolve_device,
)
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.util.threads import configure_threads


@dataclass(frozen=True)
class DecoderSpec:
    """What to decode with. `target`: a model source (path, .gguf, cached hub id, `demo`) or a
    loaded model. `draft`: a drafter spec (`speckv.decoding.drafters.make_drafter`: a draft model,
    `ngram`, `DRAFT+ngram`), a loaded draft model or a drafter; None decodes with the target alone,
    except that the demo target gets the demo drafter unless `target_only`. `controller`: a spec
    (`fixed:4`, `speckv`, …) or a controller; None = the default for the pair and level."""

    target: str | LoadedModel
    draft: str | LoadedModel | Drafter | None = None
    controller: str | Controller | None = None
    compression: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    fp32_head: bool | None = None
    gamma_max: int = 20
    costs: str = "auto"  # auto | shipped | a cost file (`speckv.decoding.local_costs`)
    batch_rows: tuple[int, ...] = ()  # a server's batch sizes: their passes join the measured costs
    target_only: bool = False

    @property
    def demo(self) -> bool:
        return self.target == "demo"

    def draft_source(self) -> str | LoadedModel | Drafter | None:
        """The drafter asked for: the demo pair's own unless one is named."""
        if self.target_only:
            if self.draft is not None:
                raise SpecKVError("a draft and target-only decoding exclude each other")
            return None
        return self.draft if self.draft is not None or not self.demo else DEMO_DRAFTER

    def controller_spec(self, compression: str) -> str | Controller:
        return self.controller or default_controller(self.demo, compression)

    def build(self, progress: bool = True) -> DecoderFactory:
        """Load the models, build the drafter for the controller, give a SpecKV controller this
        machine's cost curve (measured on first use: `progress` shows a bar), once."""
        check_gamma(self.gamma_max, "gamma_max")
        draft = self.draft_source()
        device = resolve_device(self.device)
        if isinstance(self.target, LoadedModel):
            target = self.target
        else:
            compression = resolve_compression(self.compression, device)  # auto → a level
            target = None
        # A target loaded by the caller runs under the caller's thread setting unless one is given.
        given = isinstance(self.target, LoadedModel) and self.threads is None
        threads = torch.get_num_threads() if given else configure_threads(self.threads)
        controller = None
        if draft is not None:
            level = target.compression if target is not None else compression
            controller = self.controller_spec(level)
            if not isinstance(controller, Controller):
                controller = make_controller(controller, gamma_max=self.gamma_max, compression=level)
        elif self.controller is not None:
            raise SpecKVError("a controller needs a drafter: name a draft (or drop the controller)")
        if target is None:
            target = load_model(self.target, compression, str(device), self.fp32_head)
        drafter = _drafter(draft, target, controller) if draft is not None else None
        cost_source = give_costs(controller, self.costs, target, drafter, progress, self.batch_rows)
        return DecoderFactory(target, drafter, controller, threads, cost_source)


def _drafter(draft: str | LoadedModel | Drafter, target: LoadedModel, controller: Controller) -> Drafter:
    if isinstance(draft, str):
        drafter = make_drafter(draft, target, controller.drafts)
    elif isinstance(draft, LoadedModel):
        drafter = model_drafter(draft, target, controller.drafts)
    else:
        drafter = draft
    if controller.drafts is Drafts.TREES and not drafter.branches:
        raise SpecKVError(
            f"{controller.describe()} budgets tree nodes, and {drafter.name} drafts chains: use a draft "
            "model or DRAFT+ngram with it, or a chain controller (fixed:N, heuristic, speckv)"
        )
    return drafter


@dataclass
class DecoderFactory:
    """Loaded models and prototypes; `new()` makes a decoder with its own state."""

    target: LoadedModel
    drafter: Drafter | None  # the prototype: each decoder gets `drafter.fresh()`, the weights shared
    controller: Controller | None  # the prototype: each decoder gets a copy (it adapts to its sequences)
    threads: int
    cost_source: str | None  # where a SpecKV controller's cost curve came from; None for others

    @property
    def draft_model(self) -> LoadedModel | None:
        """The draft model the drafter runs, if any (n-gram candidates need none)."""
        return self.drafter.loaded if self.drafter is not None else None

    def new(
        self, sampling: SamplingConfig | None = None, eos_token_ids: Iterable[int] | None = None
    ) -> SpeculativeDecoder:
        """A decoder for one sequence at a time (reusable one after another); `eos_token_ids`
        overrides the target's stop tokens (an empty tuple: never stop early)."""
        drafter = self.drafter.fresh() if self.drafter is not None else None
        controller = copy.deepcopy(self.controller)
        return SpeculativeDecoder(self.target, drafter, controller, sampling, eos_token_ids)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A clear error when prompt + completion outgrow a model's context."""
        check_context(self.target, self.draft_model, prompt_tokens, max_new_tokens)

    def describe(self) -> dict:
        """The configuration, for JSON output and the server's model card."""
        return {
            "target": self.target.name,
            "draft": self.drafter.name if self.drafter is not None else None,
            "compression": self.target.compression,
            "fp32_head": self.target.fp32_head,
            "precision": self.target.precision,
            "threads": self.threads,
            "controller": self.controller.describe() if self.controller is not None else None,
            "costs": self.cost_source,
        }
