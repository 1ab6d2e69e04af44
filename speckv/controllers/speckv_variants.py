"""The SpecKV variants a controller spec names: ours per token (`speckv`) and per step
(`speckv-step`), both `speckv.controllers.speckv.SpecKVController`, and the paper's objective
(`speckv-paper`), with `make_speckv` building any of them from a controller file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speckv.controllers.base import Controller
from speckv.controllers.sequence_context import CONTEXT_FEATURES, SequenceContext
from speckv.controllers.speckv import (
    PAPER_CONTEXT,
    SHIPPED,
    ControllerModels,
    SpecKVController,
    paper_features,
)
from speckv.errors import SpecKVError

VARIANTS = ("speckv", "speckv-step", "speckv-paper")
PAPER_GAMMAS = (2, 4, 6, 8)


class SpecKVPaperController(Controller):
    """The paper's objective: γ ∈ {2, 4, 6, 8} maximising clip(â)·γ + 1 (tokens per step)."""

    name = "speckv-paper"

    def __init__(self, models: ControllerModels, compression: str, gamma_max: int):
        self.models = models
        self.gammas = np.asarray([g for g in PAPER_GAMMAS if g <= min(gamma_max, models.gamma_max)], float)
        if not len(self.gammas):
            raise SpecKVError("speckv-paper needs gamma_max ≥ 2")
        self.context = SequenceContext(models.context_decay)
        width = len(paper_features(models.compressions))
        self._rows = np.zeros((len(self.gammas), width))
        self._rows[:, len(PAPER_CONTEXT) : width - 1] = models.one_hot(compression)
        self._rows[:, -1] = self.gammas
        self._context_index = [CONTEXT_FEATURES.index(name) for name in PAPER_CONTEXT]

    def reset(self) -> None:
        self.context.reset()

    def begin_step(self) -> int:
        values = self.context.values
        self._rows[:, : len(PAPER_CONTEXT)] = [values[i] for i in self._context_index]
        predicted = np.clip(self.models.paper_model.predict_fast(self._rows), 0.0, 1.0)
        return int(self.gammas[int(np.argmax(predicted * self.gammas + 1.0))])

    def end_step(self, record) -> None:
        self.context.update(record)


def make_speckv(spec: str, gamma_max: int, compression: str | None) -> Controller:
    """`speckv[:PATH][@COMPRESSION]`, likewise speckv-step and speckv-paper; no PATH = the shipped file."""
    if "@" in spec:
        spec, _, compression = spec.rpartition("@")
    name, _, rest = spec.partition(":")
    if name not in VARIANTS:
        raise SpecKVError(f"unknown SpecKV variant '{name}': use one of {', '.join(VARIANTS)}")
    path = Path(rest).expanduser() if rest else SHIPPED
    if not path.exists():
        if rest:
            raise SpecKVError(f"SpecKV controller file not found: {path}")
        raise SpecKVError(
            "this installation ships no trained SpecKV controller yet; train one with `speckv train` "
            "and pass --controller speckv:PATH"
        )
    models = ControllerModels.load(path)
    compression = compression or ("fp32" if "fp32" in models.compressions else models.compressions[0])
    if name == "speckv-paper":
        return SpecKVPaperController(models, compression, gamma_max)
    return SpecKVController(models, compression, gamma_max, per_token=name == "speckv")
