"""γ policies behind one interface (see base.Controller), built from a short spec string."""

from __future__ import annotations

from speckv.controllers.base import GAMMA_LIMIT, Controller, Drafts, check_gamma
from speckv.controllers.confidence import ConfidenceController
from speckv.controllers.fixed import BatchTableController, FixedController, TreeController
from speckv.controllers.heuristic import HeuristicController
from speckv.errors import SpecKVError

CONTROLLER_HELP = (
    "fixed:N | tree:N (N tree nodes, best-first) | heuristic[:N] (HF schedule from N, default 5) | "
    "confidence[:TAU] (HF-style adaptive threshold, default 0.4) | confidence-fixed[:TAU] | "
    "speckv[:PATH][@LEVEL] (learned; sizes token trees when PATH holds a tree model) | speckv-step[:PATH] | "
    "speckv-paper[:PATH] (no PATH: the shipped one) | batch-table[:1=3,2=2,4=1,8=0] (γ by batch size, "
    "vLLM's serving rule)"
)


def make_controller(spec: str, gamma_max: int = 20, compression: str | None = None) -> Controller:
    """Build a controller from e.g. "fixed:4", "heuristic", "confidence:0.3", "speckv:ctrl.json@int8".

    `compression` tells a learned controller the target's compression level (an "@LEVEL" suffix
    of the spec wins; default fp32)."""
    name, _, arg = spec.partition(":")
    if name.partition("@")[0] in ("speckv", "speckv-step", "speckv-paper"):
        from speckv.controllers.speckv_variants import make_speckv  # loads numpy models: only when asked for

        return make_speckv(spec, max(gamma_max, 1), compression)
    try:
        if name == "fixed":
            return FixedController(_int(arg, spec))
        if name == "batch-table":
            return BatchTableController(_table(arg) if arg else None)
        if name == "tree":
            return TreeController(_int(arg, spec))
        if name == "heuristic":
            return HeuristicController(_int(arg, spec) if arg else 5, gamma_max=max(gamma_max, 1))
        if name in ("confidence", "confidence-fixed"):
            threshold = float(arg) if arg else 0.4
            return ConfidenceController(threshold, gamma_max=gamma_max, adaptive=name == "confidence")
    except ValueError as error:
        raise SpecKVError(f"bad controller spec '{spec}': {error}") from error
    raise SpecKVError(f"unknown controller '{spec}': use {CONTROLLER_HELP}")


def default_controller(demo: bool, compression: str) -> str:
    """The learned controller for the demo pair at a level it was trained for, else fixed:4."""
    if demo:
        from speckv.controllers.speckv import shipped_levels

        if compression in shipped_levels():
            return "speckv"
    return "fixed:4"


def _table(text: str) -> dict[int, int]:
    """`1=3,2=2,4=1,8=0` as {batch size: γ}."""
    table = {}
    for item in text.split(","):
        size, _, gamma = item.partition("=")
        table[int(size)] = int(gamma)
    return table


def _int(text: str, spec: str) -> int:
    if not text:
        raise SpecKVError(f"controller '{spec}' needs a number, e.g. fixed:4")
    try:
        return int(text)
    except ValueError:
        raise SpecKVError(f"controller '{spec}': '{text}' is not an integer") from None


__all__ = [
    "GAMMA_LIMIT",
    "ConfidenceController",
    "BatchTableController",
    "Controller",
    "Drafts",
    "FixedController",
    "HeuristicController",
    "TreeController",
    "check_gamma",
    "default_controller",
    "make_controller",
]
