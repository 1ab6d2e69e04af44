"""Hugging Face's assisted-generation schedule: +2 after a fully accepted step, -1 otherwise."""

from __future__ import annotations

from speckv.controllers.base import GAMMA_LIMIT, Controller, check_gamma


class HeuristicController(Controller):
    """`transient=True` restarts from `initial_gamma` each generation (HF's "heuristic_transient");
    otherwise γ carries over between generations, as HF's "heuristic" schedule does."""

    def __init__(self, initial_gamma: int = 20, transient: bool = False, gamma_max: int = GAMMA_LIMIT):
        self.initial_gamma = check_gamma(initial_gamma, "initial gamma")
        self.gamma_max = check_gamma(gamma_max, "gamma_max")
        self.transient = transient
        self.gamma = min(initial_gamma, gamma_max)
        self.name = f"heuristic:{initial_gamma}"

    def reset(self) -> None:
        if self.transient:
            self.gamma = min(self.initial_gamma, self.gamma_max)

    def begin_step(self) -> int:
        return self.gamma

    def end_step(self, record) -> None:
        if record.gamma == 0:
            return
        if record.accepted == record.gamma:
            self.gamma = min(self.gamma + 2, self.gamma_max)
        else:
            self.gamma = max(self.gamma - 1, 1)
