"""Always draft the same number of tokens."""

from __future__ import annotations

from speckv.controllers.base import Controller, check_gamma


class FixedController(Controller):
    def __init__(self, gamma: int):
        self.gamma = check_gamma(gamma)
        self.name = f"fixed:{gamma}"

    def begin_step(self) -> int:
        return self.gamma
