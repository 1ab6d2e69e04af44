"""Always draft the same number of tokens (a chain), or of tree nodes."""

from __future__ import annotations

from speckv.controllers.base import Controller, Drafts, check_gamma


class FixedController(Controller):
    def __init__(self, gamma: int):
        self.gamma = check_gamma(gamma)
        self.name = f"fixed:{gamma}"

    def begin_step(self) -> int:
        return self.gamma


class TreeController(FixedController):
    """A fixed budget of N tree nodes, chosen by the drafter best-first (EAGLE-2's selection)."""

    drafts = Drafts.TREES

    def __init__(self, nodes: int):
        super().__init__(nodes)
        self.name = f"tree:{nodes}"
