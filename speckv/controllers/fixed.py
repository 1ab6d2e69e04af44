"""Always draft the same number of tokens (a chain), or of tree nodes."""

from __future__ import annotations

from speckv.controllers.base import Controller, Drafts, check_gamma
from speckv.errors import SpecKVError


class FixedController(Controller):
    def __init__(self, gamma: int):
        self.gamma = check_gamma(gamma)
        self.name = f"fixed:{gamma}"

    def begin_step(self) -> int:
        return self.gamma


class BatchTableController(Controller):
    """γ from a table by batch size, vLLM's rule for serving: the largest batch size in the table
    not above the current one sets γ (0: no drafting), e.g. 1→3, 2→2, 4→1, 8→0."""

    DEFAULT = {1: 3, 2: 2, 4: 1, 8: 0}

    def __init__(self, table: dict[int, int] | None = None):
        self.table = dict(sorted((table or self.DEFAULT).items()))
        if 1 not in self.table or any(size < 1 or gamma < 0 for size, gamma in self.table.items()):
            raise SpecKVError("a batch table maps batch sizes from 1 up to γ ≥ 0, e.g. 1=3,2=2,4=1,8=0")
        for gamma in self.table.values():
            if gamma:
                check_gamma(gamma)
        self.name = "batch-table:" + ",".join(f"{size}={gamma}" for size, gamma in self.table.items())
        self._gamma = self.table[1]

    def observe_batch(self, sequences: int, tokens_per_s: float | None = None, shared=None) -> None:
        self._gamma = self.table[max(size for size in self.table if size <= max(sequences, 1))]

    def begin_step(self) -> int:
        return self._gamma


class TreeController(FixedController):
    """A fixed budget of N tree nodes, chosen by the drafter best-first (EAGLE-2's selection)."""

    drafts = Drafts.TREES

    def __init__(self, nodes: int):
        super().__init__(nodes)
        self.name = f"tree:{nodes}"
